"""VLLMTeacher's translation of vLLM outputs. vLLM itself needs a GPU and is not installed on CPU
machines, so its engine is replaced by a stand-in returning vLLM-shaped outputs."""

from types import SimpleNamespace

from lmdistill.teachers import SamplingParams
from lmdistill.teachers.vllm_teacher import VLLMTeacher


class FakeLLM:
    def __init__(self):
        self.calls = []

    def chat(self, conversations, sampling, use_tqdm=False):
        self.calls.append((conversations, sampling))
        lp = {
            7: SimpleNamespace(logprob=-0.1, decoded_token="Hi"),
            9: SimpleNamespace(logprob=-2.5, decoded_token="Yo"),
        }
        return [
            SimpleNamespace(
                prompt_token_ids=[1, 2, 3],
                outputs=[
                    SimpleNamespace(text="Hi", finish_reason="stop", token_ids=[7], logprobs=[lp]),
                    SimpleNamespace(
                        text="Hi th", finish_reason="length", token_ids=[7, 8], logprobs=None
                    ),
                ],
            )
            for _ in conversations
        ]


def make_teacher():
    teacher = VLLMTeacher.__new__(VLLMTeacher)
    teacher.name = "fake"
    teacher.llm = FakeLLM()
    teacher._vllm = SimpleNamespace(SamplingParams=lambda **kw: kw)
    return teacher


def test_outputs_become_generations_with_all_samples():
    teacher = make_teacher()
    convs = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "hey"}]]
    results = list(teacher.iter_generate(convs, SamplingParams(n=2, top_logprobs=2, max_tokens=5)))
    assert [r.index for r in results] == [0, 1]
    first = results[0].generations
    assert [g.finish_reason for g in first] == ["stop", "length"]
    assert first[0].prompt_tokens == 3 and first[1].completion_tokens == 2
    assert first[0].top_logprobs == [[("Hi", -0.1), ("Yo", -2.5)]]
    sampling = teacher.llm.calls[0][1]
    assert sampling["n"] == 2 and sampling["logprobs"] == 2 and sampling["max_tokens"] == 5
