"""Text every tokenizer back-end is checked on: prose, code, digits, whitespace runs, emoji,
CJK and Korean, special-token text and the empty string."""

CORPUS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "1234567890 3.14159 -42 1e-5 2024-11-25",
    "   leading spaces, trailing   ",
    "tabs\tand\nnewlines\n\n\nand  double  spaces",
    "emoji 😀🎉👍🏽 and symbols ©®™ €",
    "한국어 문장입니다. 안녕하세요!",
    "中文和日本語のテキスト",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <|im_end|>",
    "I'm sure they'll say it's what we've done",
    "UPPER lower MiXeD",
    "\u00a0non-breaking\u2009thin space",
]

# Beyond the shared corpus: text where pre-tokenizers and SentencePiece's space handling differ.
EXTRA = [
    "I'M DONE, you'LL see; don't stop",
    "123456789 12 1234 3,141,592",
    "a\r\nb\n\n  c",
    "x   \n  y",
    "ｆｕｌｌ width ＡＢＣ",
    " leading space",
    "trailing space ",
    "<s>hello</s> world",
    "hi <s> there",
    "</s>",
    "Привет, мир! Γειά σου κόσμε",
]
