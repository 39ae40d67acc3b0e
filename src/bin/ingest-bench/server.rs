//! The `ingest` server under test, as a child process: a fresh one per scenario, so
//! its exchange is the scenario's and `VmHWM` (peak RSS since start) is the
//! scenario's peak. CPU time and memory come from `/proc/<pid>`.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ingest::proto::ingest_client::IngestClient;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, ClientTlsConfig, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How long a server may take to listen and report SERVING.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to drain and exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the server's stderr kept to explain a failure.
const LOG_LINES: usize = 40;

/// Every gRPC client of the bench: one HTTP/2 connection, plaintext or TLS, with
/// `authorization: Bearer <token>` on every call when the mode has a token.
pub type Client = IngestClient<InterceptedService<Channel, Bearer>>;

/// The interceptor of every [`Client`]: adds the bearer token, if any, to each call.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Sends `value` (`Bearer <token>`) as `authorization` on every call.
    pub fn new(value: MetadataValue<Ascii>) -> Self {
        Self(Some(value))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// How the bench reaches a server: plaintext (the default) or TLS, with or without
/// a bearer token.
#[derive(Clone, Default)]
pub struct Dial {
    tls: Option<ClientTlsConfig>,
    pub bearer: Bearer,
}

impl Dial {
    /// Over TLS with `config`, no token.
    pub fn tls(config: ClientTlsConfig) -> Self {
        Self {
            tls: Some(config),
            bearer: Bearer::default(),
        }
    }

    fn endpoint(&self, addr: &str) -> anyhow::Result<Endpoint> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(endpoint)
    }

    /// Whether the server at `addr` answers its health check with SERVING (no
    /// token: health needs no credential).
    async fn serving(&self, addr: &str) -> bool {
        let Ok(channel) = self.endpoint(addr).map(|e| e.connect_lazy()) else {
            return false;
        };
        let mut health = HealthClient::new(channel);
        let check = health.check(HealthCheckRequest::default());
        matches!(
            tokio::time::timeout(Duration::from_secs(1), check).await,
            Ok(Ok(response)) if response.get_ref().status() == ServingStatus::Serving
        )
    }

    /// `count` clients, each on its own HTTP/2 connection to `addr`, connected (and
    /// TLS handshakes done) before they are returned, so no measured phase pays
    /// for them.
    pub async fn clients(&self, addr: &str, count: usize) -> anyhow::Result<Vec<Client>> {
        let mut clients = Vec::with_capacity(count);
        for _ in 0..count {
            let channel = self
                .endpoint(addr)?
                .connect()
                .await
                .with_context(|| format!("cannot connect to ingest at {addr}"))?;
            // The server's limit applies anyway; no client-side limit on top.
            clients.push(
                IngestClient::with_interceptor(channel, self.bearer.clone())
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX),
            );
        }
        Ok(clients)
    }
}

/// A running `ingest` child; killed on drop if still running.
pub struct ChildServer {
    child: Child,
    /// `127.0.0.1:<port>` it serves gRPC on.
    pub addr: String,
    /// How its clients (and its health check) reach it.
    dial: Dial,
    /// The last lines it wrote to stderr.
    log: Arc<Mutex<VecDeque<String>>>,
}

impl ChildServer {
    /// Starts `bin` on a free port, publishing to `exchange` at `amqp_url`, with
    /// `env` on top, and waits until its health check, dialled as `dial` says (the
    /// TLS files must be in `env` for a TLS dial), reports SERVING.
    pub async fn start(
        bin: &Path,
        amqp_url: &str,
        exchange: &str,
        env: &[(&str, String)],
        dial: Dial,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut command = Command::new(bin);
        command
            .env("INGEST_LISTEN", &addr)
            .env("INGEST_ADMIN_LISTEN", "127.0.0.1:0")
            .env("INGEST_AMQP_URL", amqp_url)
            .env("INGEST_EXCHANGE", exchange)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_LINES)));
        if let Some(stderr) = child.stderr.take() {
            let log = Arc::clone(&log);
            // A plain thread: the pipe must be drained whatever the runtime does, or
            // a chatty server would block on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = log.lock().expect("log lock");
                    if log.len() == LOG_LINES {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            });
        }
        let mut server = Self {
            child,
            addr,
            dial,
            log,
        };
        server.wait_serving().await?;
        Ok(server)
    }

    async fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "ingest exited with {status} before serving; its last output:\n{}",
                    self.log_tail()
                );
            }
            if self.dial.serving(&self.addr).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "ingest at {} did not report SERVING within {READY_TIMEOUT:?}; its last \
                     output:\n{}",
                    self.addr,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `count` clients, each on its own connection to this server.
    pub async fn clients(&self, count: usize) -> anyhow::Result<Vec<Client>> {
        self.dial.clients(&self.addr, count).await
    }

    /// The server's last lines of stderr.
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// User plus system CPU time the server used so far, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name, which is in parentheses and may hold spaces;
        // utime and stime are fields 14 and 15 of the whole line.
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("malformed /proc/<pid>/stat")?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| -> anyhow::Result<u64> {
            Ok(fields
                .get(i)
                .context("short /proc/<pid>/stat")?
                .parse::<u64>()?)
        };
        // `after` starts at field 3 (state), so field n is at index n - 3.
        let total = ticks(14 - 3)? + ticks(15 - 3)?;
        Ok(total as f64 / clock_ticks() as f64)
    }

    /// Peak resident memory since the server started (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        self.status_kib("VmHWM:").map(|kib| kib * 1024)
    }

    /// Resident memory now (`VmRSS`), in bytes.
    pub fn rss(&self) -> anyhow::Result<u64> {
        self.status_kib("VmRSS:").map(|kib| kib * 1024)
    }

    fn status_kib(&self, key: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no {key} in /proc/<pid>/status"))
    }

    /// SIGTERM, then waits for the drain; kills the server if it takes too long.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "ingest did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it. Its last \
             output:\n{}",
            self.log_tail()
        )
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Waits until the server at `addr` (not started by the bench) reports SERVING.
pub async fn wait_remote(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while !Dial::default().serving(addr).await {
        if Instant::now() >= deadline {
            bail!("the server at {addr} did not report SERVING within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The `ingest` binary: `--ingest-bin`, else the one next to this executable.
pub fn ingest_bin(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let bin = match given {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("ingest"),
    };
    anyhow::ensure!(
        bin.is_file(),
        "no ingest binary at {} (build it, or pass --ingest-bin or --addr)",
        bin.display()
    );
    Ok(bin)
}

/// Clock ticks per second of `/proc/<pid>/stat` times: `getconf CLK_TCK`, which is
/// 100 on practically every Linux.
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}
