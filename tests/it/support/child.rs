//! The real `ingest` binary as a child process: for signals and for reading its
//! memory from `/proc`, which an in-process server cannot give.

use std::{
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use ingest::proto::ingest_client::IngestClient;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const GUARD: Duration = Duration::from_secs(30);

/// A running `ingest` process, killed on drop if still running.
pub struct ChildServer {
    pub child: Child,
    pub addr: String,
}

impl ChildServer {
    /// Starts `ingest` on a free port with the broker and exchange given, plus `env`.
    pub fn start(amqp_url: &str, exchange: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with_stderr(amqp_url, exchange, env, Stdio::inherit())
    }

    /// Like [`ChildServer::start`], with the server's log lines (stderr) sent to `stderr`.
    pub fn start_with_stderr(
        amqp_url: &str,
        exchange: &str,
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Self {
        Self::start_wrapped(&[], amqp_url, exchange, env, stderr)
    }

    /// Like [`ChildServer::start_with_stderr`], run through `wrapper` (a program and
    /// its arguments that execs the binary, e.g. `prlimit --nofile=64`), so the pid
    /// is still the server's.
    pub fn start_wrapped(
        wrapper: &[&str],
        amqp_url: &str,
        exchange: &str,
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let binary = env!("CARGO_BIN_EXE_ingest");
        let mut command = match wrapper {
            [] => Command::new(binary),
            [program, args @ ..] => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
        };
        command
            .env("INGEST_LISTEN", &addr)
            .env("INGEST_ADMIN_LISTEN", "127.0.0.1:0")
            .env("INGEST_AMQP_URL", amqp_url)
            .env("INGEST_EXCHANGE", exchange)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr);
        for (key, value) in env {
            command.env(key, value);
        }
        Self {
            child: command.spawn().unwrap(),
            addr,
        }
    }

    /// Connects once the server listens and reports SERVING.
    pub async fn ready_client(&self) -> IngestClient<Channel> {
        let deadline = tokio::time::Instant::now() + GUARD;
        loop {
            if let Ok(channel) = Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
            {
                let status = HealthClient::new(channel.clone())
                    .check(HealthCheckRequest::default())
                    .await
                    .map(|r| r.into_inner().status());
                if matches!(status, Ok(ServingStatus::Serving)) {
                    return IngestClient::new(channel);
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ingest did not become SERVING"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new client on a new HTTP/2 connection.
    pub async fn client(&self) -> IngestClient<Channel> {
        IngestClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    /// Resident memory now and at its peak, in bytes (`VmRSS`, `VmHWM`).
    pub fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in /proc status"))
        };
        (kib("VmRSS:") * 1024, kib("VmHWM:") * 1024)
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + GUARD;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ingest did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
