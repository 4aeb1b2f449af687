//! vLLM block hashes (helper A writes this).
