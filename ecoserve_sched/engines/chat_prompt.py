"""The last user message of a prompt rendered by a chat template: what a ``last_user`` bundle
was trained on.

vLLM's engine core sees token ids only; decoded, they are the rendered template (system prompt,
earlier turns, role words), and a bundle trained on the last user message predicted a different
bucket for half of 300 ShareGPT prompts from it (``benchmarks/template_skew.py``). Rendering
three probe messages through the same template gives the text that opens a user turn and the
text that closes one: the part common to the first turn's opening and a later one's (from its
first special token on), and the first special token common to the closing before the
assistant's reply and before the generation prompt. Both must hold one of the tokenizer's
special tokens, which a message's own text does not produce when rendered, so the last
opening in a prompt is the last user turn's; otherwise (a template of plain words, or no template)
there are no markers and the caller keeps the whole text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

#: Probe contents: plain words no template rewrites (templates may trim whitespace).
PROBES = ("ecoserveprobeAlpha", "ecoserveprobeBravo", "ecoserveprobeCharlie")


@dataclass(frozen=True)
class TurnMarkers:
    """What opens and what closes a user turn in a rendered prompt; ``tool_prefix`` starts a
    user turn that holds tool results (Qwen's ``<tool_response>``), ``specials`` are the
    tokenizer's special tokens, removed from the content (a multimodal prompt's image
    placeholders, one per patch)."""

    user_open: str
    user_close: str
    tool_prefix: str = ""
    specials: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def last_user(self, text: str) -> str | None:
        """The content of the last user turn in ``text`` (decoded with its special tokens) that
        is not tool results, without special tokens; None when ``text`` has no such turn."""
        end = len(text)
        while (i := text.rfind(self.user_open, 0, end)) >= 0:
            start = i + len(self.user_open)
            if self.tool_prefix and text.startswith(self.tool_prefix, start):
                end = i  # training's last user message is the last one whose role is user
                continue
            stop = text.find(self.user_close, start)
            content = text[start:] if stop < 0 else text[start:stop]
            return self.specials.sub("", content) if self.specials is not None else content
        return None


def turn_markers(tokenizer: Any) -> tuple[TurnMarkers | None, str]:
    """The markers of ``tokenizer``'s chat template, or None and why there are none."""
    a, b, c = PROBES
    try:
        one = tokenizer.apply_chat_template([{"role": "user", "content": a}], tokenize=False,
                                            add_generation_prompt=True)
        three = tokenizer.apply_chat_template([{"role": "user", "content": a}, {"role": "assistant", "content": b},
                                               {"role": "user", "content": c}], tokenize=False,
                                              add_generation_prompt=True)
    except Exception as e:  # no template, or a tokenizer without the method (vLLM's Mistral one)
        return None, f"the tokenizer renders no chat template ({type(e).__name__}: {e})"
    if not (isinstance(one, str) and isinstance(three, str) and one.count(a) == 1
            and all(three.count(p) == 1 for p in PROBES)):
        return None, "the chat template does not render messages as written"
    ia, ib, ic = (three.index(p) for p in PROBES)
    if not ia < ib < ic:
        return None, "the chat template reorders messages"
    opening = _common_prefix(one[: one.index(a)][::-1], three[ib + len(b): ic][::-1])[::-1]
    closing = _common_prefix(three[ia + len(a): ib], three[ic + len(c):])
    specials = _special_tokens(tokenizer)
    first_open = min((i for i in (opening.find(t) for t in specials) if i >= 0), default=-1)
    first_close = min(((i, i + len(t)) for t, i in ((t, closing.find(t)) for t in specials) if i >= 0),
                      default=None)
    if first_open < 0 or first_close is None:
        return None, (f"the chat template's user turn ({opening!r} ... {closing!r}) is not marked by a "
                      "special token")
    # from the opening's first special token on (a common tail can start inside the token
    # before it: "|>" of Llama 3's <|begin_of_text|> and <|eot_id|>), and the closing's first
    opening, closing = opening[first_open:], closing[: first_close[1]]
    pattern = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    return TurnMarkers(opening, closing, _tool_prefix(tokenizer, opening), pattern), ""


def _tool_prefix(tokenizer: Any, opening: str) -> str:
    """What a tool result's turn starts with where the template renders it as a user turn
    (Qwen: ``<tool_response>``); "" where it does not, or cannot say."""
    a, b, c = PROBES
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": a}, {"role": "assistant", "content": b},
             {"role": "tool", "content": c, "tool_call_id": "0", "name": "probe"}],
            tokenize=False, add_generation_prompt=True)
    except Exception:  # no tool role in this template
        return ""
    if not isinstance(text, str) or text.count(c) != 1:
        return ""
    before = text[: text.index(c)]
    i = before.rfind(opening)
    return before[i + len(opening):] if i >= 0 and i > before.find(b) else ""


def _common_prefix(x: str, y: str) -> str:
    n = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
    return x[:n]


def _special_tokens(tokenizer: Any) -> list[str]:
    names = set(getattr(tokenizer, "all_special_tokens", None) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    names.update(t.content for t in decoder.values() if getattr(t, "special", False))
    return [n for n in names if n]
