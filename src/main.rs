//! The `ingest` binary: parse the configuration, install logging, bind, run.

use std::process::ExitCode;

use ingest::config::Config;

/// `EX_USAGE`: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ingest: invalid configuration:\n{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let telemetry = ingest::telemetry::init(config.log_format);
    for notice in &config.notices {
        tracing::info!("{notice}");
    }
    let result = ingest::run(config, ingest::shutdown::signal()).await;
    if let Err(error) = &result {
        tracing::error!(%error, "ingest stopped");
    }
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
