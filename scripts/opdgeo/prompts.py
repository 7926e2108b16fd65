"""A task's examples, and the prompts a model reads: every prompt template is rendered here.

A prompt is text (the addition task) or chat messages ([{"role": "user", "content": ...}]:
data sets, the squares task). Three templates make the text a model reads:

- a data set's question (a string column) as one user message: the data set's `template`
  ({problem}: the question), `question_prompt`;
- a self-distillation teacher's prompt: the prompt with a privileged context (the reference
  solution) after its last message, `privileged_prompt` ({prompt}: that message, {context}:
  the context), through the task's template (a data set's `privileged_template`, by default
  PRIVILEGED_TEMPLATE; the addition task's own);
- a model's chat template: TRL applies it when training (`model_prompt` hands it messages
  when the model has one), `render_prompts` when evaluating; a model without one reads the
  messages' contents alone.
"""

from dataclasses import dataclass
from typing import Any

# A data set's question as its user message when the data set gives no `template`.
QUESTION_TEMPLATE = "{problem}"
# The self-distillation teacher's prompt when a data set gives no `privileged_template`.
PRIVILEGED_TEMPLATE = ("{prompt}\n\nA reference solution to this problem, shown to you alone:\n"
                       "{context}\n\nWith that solution understood, solve the problem above in "
                       "your own words.")


@dataclass(frozen=True)
class Example:
    prompt: str | list  # text, or chat messages [{"role", "content"}]
    answer: str
    image: Any = None  # a PIL image the prompt is about (vision-language tasks)
    # The privileged context a self-distillation teacher reads: the reference solution (the
    # addition task: the answer), None when the task has none; `row`: its data set row.
    context: str | None = None
    row: int | None = None


def question_prompt(template: str, question: str) -> list[dict]:
    """A data set's question as chat messages: one user message, through `template`."""
    return [{"role": "user", "content": template.format(problem=question)}]


def privileged_prompt(template: str, prompt, context: str):
    """The prompt (text, or chat messages) with `context` in it through `template`: the text
    itself, or the last message's content."""
    if isinstance(prompt, str):
        return template.format(prompt=prompt, context=context)
    last = prompt[-1]
    return [*prompt[:-1], {**last, "content": template.format(prompt=last["content"],
                                                              context=context)}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def model_prompt(tokenizer, prompt):
    """A task prompt in the form a trainer takes: chat messages when the model has a chat
    template (TRL applies it), else plain text (the messages' contents, one per line)."""
    if isinstance(prompt, str) or has_chat_template(tokenizer):
        return prompt
    return "\n".join(m["content"] for m in prompt)


def render_prompts(tokenizer, prompts: list, images: list | None = None
                   ) -> tuple[list[str], bool]:
    """Prompts as text to tokenize, and whether the tokenizer should add special tokens
    (not after a chat template, which writes its own). With `images` (one per prompt), each
    prompt gets an image placeholder as TRL's trainers place it; the processor expands it."""
    prompts = [model_prompt(tokenizer, p) for p in prompts]
    if images:
        from trl.data_utils import prepare_multimodal_messages

        prompts = [prepare_multimodal_messages(p, images=[None]) for p in prompts]
    if not prompts or isinstance(prompts[0], str):
        return prompts, True
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return texts, False
