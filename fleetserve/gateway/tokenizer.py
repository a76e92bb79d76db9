"""The gateway's tokenizer: prompts to token ids for prefix-aware routing and token budgets,
and token ids to text when a migrated stream is re-detokenized.

The gateway process never imports torch. `transformers.AutoTokenizer` does (through its
config classes), and so does reading a GGUF file's vocabulary; `PreTrainedTokenizerFast`
does not. So an HF folder loads with `PreTrainedTokenizerFast` directly, and a `.gguf` file
is converted once, in a short-lived child process, to an HF folder that then loads the same
way.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_CONVERT = """
import sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2])
tok.save_pretrained(sys.argv[3])
"""


class TokenizerFiles:
    """Owns the temporary folder of a converted GGUF tokenizer."""

    def __init__(self) -> None:
        self.tmpdir: str | None = None

    def cleanup(self) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def load_tokenizer(path: str | Path, files: TokenizerFiles | None = None) -> Any:
    """An HF folder holding tokenizer.json, or a .gguf file. Raises FileNotFoundError or
    ValueError with what to pass instead."""
    from transformers import PreTrainedTokenizerFast

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {p} does not exist")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{p}: expected an HF model folder or a .gguf file")
        files = files or TokenizerFiles()
        files.tmpdir = tempfile.mkdtemp(prefix="fleetserve-gateway-tok-")
        logger.info("converting the tokenizer of %s (in a child process)", p.name)
        subprocess.run(
            [sys.executable, "-c", _CONVERT, str(p.parent), p.name, files.tmpdir],
            check=True,
            capture_output=True,
            timeout=300,
        )
        p = Path(files.tmpdir)
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{p} holds no tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(p)


class PromptTokenizer:
    """Turns request bodies into the prompt token ids a fleetserve replica will see."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def prompt_ids(self, body: dict, chat: bool) -> list[int] | None:
        """None when the prompt is not one sequence (a batch) or cannot be tokenized."""
        try:
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list):
                    return None
                # As the replica does: render the template, then encode without adding
                # special tokens (the template holds any BOS).
                text = self.tokenizer.apply_chat_template(
                    [{"role": m["role"], "content": _text(m.get("content"))} for m in messages],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                return list(self.tokenizer.encode(text, add_special_tokens=False))
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, str):
                return list(self.tokenizer.encode(prompt))
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                return list(prompt)
        except Exception:  # a template that rejects these messages: the replica will say so
            logger.debug("could not tokenize a prompt for routing", exc_info=True)
        return None


def _text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))


def estimate_prompt_tokens(body: dict, chat: bool) -> int:
    """Without a tokenizer: about four characters a token."""
    if chat:
        chars = 0
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(
                    len(str(part.get("text", ""))) for part in content if isinstance(part, dict)
                )
        return chars // 4 + 1
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return sum(len(p) // 4 + 1 if isinstance(p, str) else len(p) for p in prompt)
    return 1
