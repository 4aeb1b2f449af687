//! pd-bench: load generator for OpenAI-compatible endpoints (see
//! `pd-bench --help` and docs/pd-bench.md).

fn main() {
    let args: Vec<String> =
        std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    std::process::exit(pdgate_sim::bench::main(&args));
}
