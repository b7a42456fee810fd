"""`npcpu generate`: a language-model run's checkpoint continues a prompt, streamed as text.

Streaming decodes the whole sample so far at each new token and writes what was added: a byte or
BPE token may end in the middle of a UTF-8 character, which decodes to U+FFFD until the rest of
the character arrives, so a trailing U+FFFD is held back until the next token (or the end).
"""

from __future__ import annotations

import numpy as np

from npcpu.config import ConfigError

REPLACEMENT = "\ufffd"


class TextStream:
    """Writes the decoded text of a growing list of token ids to `out` as it grows.

    Ids the tokenizer does not have (a model vocabulary padded beyond the data's) are left out
    of the text. Without a tokenizer (SyntheticText), ids are written as numbers.
    """

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.written = 0  # characters of the decoded text already written

    def __call__(self, column: np.ndarray) -> None:
        token = int(column[0])
        if self.tokenizer is None:
            self.out.write(f"{token} ")
            self.out.flush()
            return
        if token < self.tokenizer.vocab_size:
            self.ids.append(token)
        self._write(final=False)

    def _write(self, final: bool) -> None:
        text = self.tokenizer.decode(np.asarray(self.ids, dtype=np.int64))
        end = len(text) if final else len(text.rstrip(REPLACEMENT))
        if end > self.written:
            self.out.write(text[self.written:end])
            self.out.flush()
            self.written = end

    def close(self) -> None:
        if self.tokenizer is not None:
            self._write(final=True)
        self.out.write("\n")
        self.out.flush()


def prompt_ids(tokenizer, prompt: str) -> np.ndarray:
    """(1, T0) int64 ids of `prompt`; an empty prompt starts from a newline (nanoGPT's start)
    when the tokenizer has one, else from id 0."""
    if tokenizer is not None:
        try:
            ids = tokenizer.encode(prompt or "\n")
        except ValueError as error:
            if prompt:
                raise ValueError(f"generate: the prompt cannot be encoded by the run's "
                                 f"tokenizer: {error}") from None
            ids = np.zeros(1, dtype=np.int64)
    elif prompt:
        try:
            ids = np.array([int(t) for t in prompt.split()], dtype=np.int64)
        except ValueError:
            raise ValueError("generate: a synthetic_text run has no tokenizer; give the prompt "
                             "as token ids separated by spaces") from None
    else:
        ids = np.zeros(1, dtype=np.int64)
    if ids.shape[0] == 0:
        ids = np.zeros(1, dtype=np.int64)
    return np.asarray(ids, dtype=np.int64)[None, :]


def generate_from_run(run_dir, checkpoint_path, prompt: str, max_new_tokens: int,
                      temperature: float, top_k: int | None, seed: int, out) -> np.ndarray:
    """Load the run's model from `checkpoint_path`, write prompt and sample to `out` as they
    come; returns the ids (1, T0 + max_new_tokens)."""
    from npcpu.train.build import bind_tokenizer, build_run, load_run_config

    config = load_run_config(run_dir)
    if config["model"]["kind"] != "gpt":
        raise ConfigError(f"{run_dir}: generate needs a language-model run (model.kind 'gpt'), "
                          f"this one is {config['model']['kind']!r}")
    run = build_run(config)
    bind_tokenizer(run, run_dir, new_run=False)
    run.trainer.resume(checkpoint_path)
    model = run.trainer.model
    tokenizer = getattr(run.eval_data, "tokenizer", None)
    if top_k is not None:
        top_k = min(top_k, model.config.vocab_size)
    idx = prompt_ids(tokenizer, prompt)
    out.write(prompt + (" " if tokenizer is None and prompt else ""))
    stream = TextStream(tokenizer, out)
    tokens = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                            seed=seed, on_token=stream)
    stream.close()
    return tokens
