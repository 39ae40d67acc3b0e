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
    ingest::telemetry::init();
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(listen = %config.listen, %error, "cannot bind the gRPC listener");
            return ExitCode::FAILURE;
        }
    };
    match ingest::run(config, listener, ingest::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "ingest stopped");
            ExitCode::FAILURE
        }
    }
}
