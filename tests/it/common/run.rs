//! Runs the real `certmq` binary for the CLI tests (contract §1): exit code, stdout and stderr,
//! exactly what an operator's shell or script sees.

use std::path::Path;
use std::process::Command;

/// What one run of the binary produced.
#[derive(Debug)]
pub struct Run {
    /// `None` when a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `certmq ARGS` in `cwd`, with `RUST_LOG` unset so that logging is at its default,
/// and `CERTMQ_CONFIG` unset so that an operator's own setting never picks the config.
pub fn certmq(cwd: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_certmq"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .env_remove("CERTMQ_CONFIG")
        .output()
        .expect("run certmq");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A path as a command-line argument (tempdir paths are UTF-8).
pub fn arg(p: &Path) -> &str {
    p.to_str().expect("tempdir paths are UTF-8")
}
