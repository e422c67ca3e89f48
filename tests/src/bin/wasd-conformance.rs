//! Run the provider conformance suite on any module:
//!
//! ```text
//! cargo run -p wasd-tests --bin wasd-conformance -- MODULE.wasm
//!     [--settings 'suffix = "cluster.local"'] [--grants 'dns = ["cluster.local"]']
//!     [--query QUERY]... [--static-table]
//! ```
//!
//! Prints one line per check; exits 1 when one fails, 2 on bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use wasd_tests::conformance::Suite;

const USAGE: &str = "usage: wasd-conformance MODULE.wasm [--settings TOML] [--grants TOML] [--query QUERY]... [--static-table]";

#[tokio::main]
async fn main() -> ExitCode {
    let mut suite = Suite::default();
    let mut module = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        let parsed = match arg.as_str() {
            "--settings" => value("--settings").map(|v| suite.settings = Some(v)),
            "--grants" => value("--grants").map(|v| suite.grants = Some(v)),
            "--query" => value("--query").map(|v| suite.queries.push(v)),
            "--static-table" => {
                suite.static_table = true;
                Ok(())
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other if other.starts_with('-') => Err(format!("unknown option {other}")),
            other if module.is_none() => {
                module = Some(PathBuf::from(other));
                Ok(())
            }
            other => Err(format!("unexpected argument {other}")),
        };
        if let Err(e) = parsed {
            eprintln!("wasd-conformance: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let Some(module) = module else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let report = suite.run(&module).await;
    println!("{report}");
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
