//! `cargo bench --bench load -- <workload> [options]`: the load generator's command.
//!
//! A thin main over `load/` (also compiled into `tests/bench_smoke.rs`): parse, run on a
//! multi-threaded runtime (the generator must be able to use both cores when the broker
//! idles), print the result as a table or one JSON line, exit 1 with the error chain on
//! failure. See `load/mod.rs` for the design and `benches/compare.sh` for the comparison
//! with Mosquitto.

#[path = "load/mod.rs"]
mod load;

use std::error::Error;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = load::cli::Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    match runtime.block_on(load::run(&args)) {
        Ok(report) => {
            if args.json {
                println!("{}", report.json());
            } else {
                print!("{}", report.table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn Error) -> ExitCode {
    let mut line = format!("load: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(&format!(": {c}"));
        cause = c.source();
    }
    eprintln!("{line}");
    ExitCode::FAILURE
}
