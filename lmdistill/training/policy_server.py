"""On-policy samples through an OpenAI-compatible server (`on_policy.server`, issue #12).

The trainer keeps the student; the server (`lmdistill serve --allow-weight-reload`, or vLLM with a
weight-reload endpoint) decodes it. Before an on-policy step the trainer's main process writes the
student's weights as one safetensors file and asks the server to load them (POST
ROOT/reload_weights {"path"}), so the samples come from the weights being trained, at most
`sync_every` optimizer steps old. A step's prompts go out as token ids in one /v1/completions
request with `return_token_ids`, and the sampled token ids come back as they were sampled: no
decoding and re-tokenizing, so the teacher scores exactly the tokens the student chose.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import httpx
import openai
from torch import nn

from lmdistill.errors import UserError
from lmdistill.training.config import PolicyServer


class PolicyServerClient:
    """Pushes the student's weights to the server and samples completions from it."""

    def __init__(self, settings: PolicyServer, run_dir: Path) -> None:
        self.settings = settings
        env = settings.api_key_env
        key = os.environ.get(env) if env else None
        if env and not key:
            raise UserError(f"on_policy.server.api_key_env: ${env} is not set")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = settings.url.rstrip("/")
        # The control endpoint sits at the server's root, beside /v1 (as vLLM's do).
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        self.client = openai.OpenAI(
            base_url=self.url, api_key=key or "none", timeout=settings.timeout_s, max_retries=2
        )
        self.weights = run_dir / "policy" / "weights.safetensors"
        self.synced_step: int | None = None  # the step whose weights the server holds
        self._model = settings.model

    def due(self, step: int) -> bool:
        """Whether the server's copy is too old to sample optimizer step `step` from."""
        return self.synced_step is None or step - self.synced_step >= self.settings.sync_every

    def push(self, model: nn.Module) -> None:
        """Write `model`'s weights (atomically: a reader never sees half a file) and have the
        server load them."""
        from safetensors.torch import save_model

        self.weights.parent.mkdir(parents=True, exist_ok=True)
        partial = self.weights.with_suffix(".partial")
        save_model(model, str(partial))
        os.replace(partial, self.weights)
        try:
            response = httpx.post(
                f"{self.root}/reload_weights",
                json={"path": str(self.weights.resolve())},
                headers=self.headers,
                timeout=self.settings.timeout_s,
            )
        except httpx.HTTPError as exc:
            raise UserError(f"on_policy.server: cannot reach {self.root}: {exc}") from None
        if response.status_code in (403, 404, 405):
            raise UserError(
                f"on_policy.server: {self.root} does not accept POST /reload_weights "
                f"(HTTP {response.status_code}); start `lmdistill serve` with "
                "--allow-weight-reload, or sample in-process (drop on_policy.server)"
            )
        if response.status_code != 200:
            raise UserError(
                f"on_policy.server: {self.root}/reload_weights failed "
                f"(HTTP {response.status_code}): {_error_message(response)}"
            )

    def sample(
        self,
        prompts: Sequence[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        stop_ids: set[int],
    ) -> list[list[int]]:
        """One sampled completion (token ids, ending with its stop token if it finished) per
        prompt; the server samples from the full distribution (top_k off)."""
        try:
            response = self.client.completions.create(
                model=self.model(),
                prompt=[list(p) for p in prompts],
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                extra_body={
                    "return_token_ids": True,
                    "stop_token_ids": sorted(stop_ids),
                    "top_k": -1,
                    "skip_special_tokens": False,
                },
            )
        except openai.APIConnectionError as exc:
            raise UserError(f"on_policy.server: cannot reach {self.url}: {exc}") from None
        except openai.APIStatusError as exc:
            raise UserError(
                f"on_policy.server: {self.url}/completions failed (HTTP {exc.status_code}): "
                f"{exc.message}"
            ) from None
        choices = sorted(response.choices, key=lambda c: c.index)
        if len(choices) != len(prompts):
            raise UserError(
                f"on_policy.server: {len(choices)} completions for {len(prompts)} prompts"
            )
        completions = []
        for choice in choices:
            ids = (choice.model_extra or {}).get("token_ids")
            if ids is None:
                raise UserError(
                    f"on_policy.server: {self.url} returned no token ids (it must honour "
                    "return_token_ids: lmdistill serve, or vLLM >= 0.10.2)"
                )
            completions.append([int(t) for t in ids])
        return completions

    def model(self) -> str:
        """The served model's id: the configured one, else the first the server lists."""
        if self._model is None:
            try:
                listed = [m.id for m in self.client.models.list().data]
            except openai.APIError as exc:
                raise UserError(f"on_policy.server: cannot list {self.url}/models: {exc}") from None
            if not listed:
                raise UserError(f"on_policy.server: {self.url} serves no model")
            self._model = listed[0]
        return self._model


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
