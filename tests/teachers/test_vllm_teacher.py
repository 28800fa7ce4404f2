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
    assert first[0].top_ids == [[7, 9]] and first[0].token_ids == [7]
    assert first[1].top_logprobs is None and first[1].top_ids is None  # no logprobs returned
    sampling = teacher.llm.calls[0][1]
    assert sampling["n"] == 2 and sampling["logprobs"] == 2 and sampling["max_tokens"] == 5


def test_top_k_and_sampled_tokens_come_with_their_ids():
    """vLLM's dicts are keyed by token id; with logprobs=k they hold the top k plus the sampled
    token when it ranks below k. The ids are kept as given, aligned with the texts."""
    teacher = make_teacher()
    per_token = [
        {  # the sampled token (11) is third: outside the top 2
            7: SimpleNamespace(logprob=-0.2, decoded_token="Hi"),
            9: SimpleNamespace(logprob=-1.9, decoded_token="Yo"),
            11: SimpleNamespace(logprob=-4.0, decoded_token=None),
        },
        {  # the sampled token (5) is the best
            5: SimpleNamespace(logprob=-0.05, decoded_token="!"),
            3: SimpleNamespace(logprob=-3.1, decoded_token="?"),
        },
    ]
    choice = SimpleNamespace(text="..", finish_reason="stop", token_ids=[11, 5], logprobs=per_token)
    teacher.llm.chat = lambda conversations, sampling, use_tqdm=False: [
        SimpleNamespace(prompt_token_ids=[1], outputs=[choice])
    ]
    (result,) = teacher.iter_generate(
        [[{"role": "user", "content": "x"}]], SamplingParams(top_logprobs=2)
    )
    (generation,) = result.generations
    assert generation.top_ids == [[7, 9], [5, 3]]
    assert generation.top_logprobs == [[("Hi", -0.2), ("Yo", -1.9)], [("!", -0.05), ("?", -3.1)]]
    assert generation.token_ids == [11, 5]
    assert generation.token_logprobs == [("11", -4.0), ("!", -0.05)]


def test_the_ids_reach_the_generated_records(tmp_path):
    """`lmdistill generate` writes them next to the texts, for a cache or the sparse loss."""
    import json

    from lmdistill.pipelines.generate import Prompt, generate

    teacher = make_teacher()
    prompts = [Prompt(id="p", messages=[{"role": "user", "content": "hello"}], fields={}, line=1)]
    generate(
        teacher, prompts, tmp_path / "out.jsonl", SamplingParams(top_logprobs=2), progress=False
    )
    record = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert record["top_ids"] == [[7, 9]] and record["token_ids"] == [7]
    assert record["top_logprobs"] == [[["Hi", -0.1], ["Yo", -2.5]]]
