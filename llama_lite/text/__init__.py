"""Text in and out: the Tokenizer and its back-ends (SentencePiece, Hugging Face tokenizers, a GGUF
vocabulary), the detokenizer, chat templates.
"""
