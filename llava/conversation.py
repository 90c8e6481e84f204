"""Prompt templates. A template turns a referring expression into the text the model reads.

The image stands where `image_token` is; each adapter passes its own placeholder (the llava-hf
processor expands "<image>" into V image tokens, the original LLaVA splices features at it).
No assistant turn is opened: the last token is the end of the expression (method.md §2).
"""

REFERSEG_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

TEMPLATES = {
    # The reference code's prompt for LLaVA-1.5: system string, image, expression.
    "referseg": REFERSEG_SYSTEM + "\n{image}\n{query}",
    # Image then expression, nothing else: the bundled toy model is trained on this.
    "plain": "{image}\n{query}",
}


def build_prompt(conv_mode: str, query: str, image_token: str) -> str:
    """The model's input text for one expression; raises ValueError naming the known modes.
    "auto" (every family's default: its own template) is "referseg" for LLaVA-1.5."""
    conv_mode = "referseg" if conv_mode == "auto" else conv_mode
    if conv_mode not in TEMPLATES:
        raise ValueError(f"model.conv_mode={conv_mode!r} is unknown; use one of {sorted(TEMPLATES)}")
    return TEMPLATES[conv_mode].format(image=image_token, query=query.strip())
