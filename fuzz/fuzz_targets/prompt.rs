//! Runs `pdgate_core::fuzzcheck::prompt` (the same checks the corpus replay runs on stable).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pdgate_core::fuzzcheck::prompt(data));
