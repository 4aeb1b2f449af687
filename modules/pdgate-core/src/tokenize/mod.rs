//! Tokenizer (helper B writes this).
