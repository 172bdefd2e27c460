"""The inference engine (no torch, no devices): bundle, tokenizer, image preprocessing, prompt,
output grammar and parser, action de-normalisation, the decode loop and its backends."""
