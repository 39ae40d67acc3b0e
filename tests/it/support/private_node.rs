//! A throwaway RabbitMQ node of a test's own, for the faults that would break
//! the shared broker for everyone else: restarting the broker (`stop_app` /
//! `start_app`) and raising a memory alarm (publishers get
//! `connection.blocked`).
//!
//! Each node gets a fresh AMQP port `p` plus distribution port `p + 20000`, a
//! fresh folder under `/tmp`, and its own config file, so nothing is shared
//! with the broker on 127.0.0.1:5672 except epmd (which only maps names to
//! ports) and the Erlang cookie.
//!
//! The `/usr/sbin` wrappers are used on purpose: run as root they `su` to the
//! `rabbitmq` user, whose HOME (`/var/lib/rabbitmq`) holds the Erlang cookie
//! the shared node uses too. That is why `rabbitmqctl` works as root, and the
//! same cookie lets it talk to private nodes. The node runs as `rabbitmq`, so
//! its folder is chowned to that user.
//!
//! Broker behaviour worth knowing when writing tests against it (3.10):
//! `connection.blocked` is sent only once a connection publishes while the
//! alarm is on (not on connect, not when the alarm starts), and a blocked
//! connection is not read from at all, so check queue depths over a
//! connection that never publishes. `stop_app` loses non-durable queues and
//! transient messages.
//!
//! [`PrivateNode::kill9`] (SIGKILL by the pid file) or [`PrivateNode::shutdown`]
//! stop the whole VM, and [`PrivateNode::restart`] boots it again on the same
//! name, ports and data: what a member of a [`super::Cluster`] needs.
//!
//! [`PrivateNode::start_with_tls`] adds a TLS listener (`amqps://`) on a port of
//! its own, with a certificate the test made; the plain listener stays.
//!
//! The node is shut down (and its folder removed) on drop, also when the test
//! panics; a detached watchdog does the same if the test process is killed.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::process::Command;
use tokio::time::{Instant, sleep, timeout};

/// How long the node may take to boot (and `start_app` to finish).
const STARTUP: Duration = Duration::from_secs(60);
/// Upper bound for any single `rabbitmqctl` call.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for an alarm change to show up.
const ALARM_TIMEOUT: Duration = Duration::from_secs(30);
/// The distribution port is the AMQP port plus this.
const DIST_OFFSET: u16 = 20_000;
/// AMQP ports are drawn from here, so both `p` and `p + 20000` (30000..32767)
/// stay below the kernel's ephemeral range (32768..) where `bind(:0)` and
/// outgoing connections of other tests would compete for them, and clear of
/// rabbitmqctl's own distribution ports (35672..35682).
const PORT_RANGE: std::ops::Range<u16> = 10_000..12_768;
/// Lines of the node's log quoted when it fails to come up.
const LOG_TAIL_LINES: usize = 60;
/// Watermarks: one low enough to trip the memory alarm at once, and the default.
const WATERMARK_ALARM: &str = "0.0001";
const WATERMARK_DEFAULT: &str = "0.4";

/// Ports handed out by this process and not yet bound by their node, so two
/// tests starting nodes at once cannot pick the same pair.
static TAKEN_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
static NODE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running private RabbitMQ node; shut down and deleted on drop.
pub struct PrivateNode {
    name: String,
    port: u16,
    dir: PathBuf,
    /// The TLS listener's port, if it has one.
    tls_port: Option<u16>,
}

/// What a node's TLS listener presents, PEM: its certificate and key, and the CA
/// RabbitMQ is given as `cacertfile` (clients are not asked for certificates).
#[derive(Clone)]
pub struct NodeTls {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl PrivateNode {
    /// Starts a fresh node and waits until it has fully booted. Panics with
    /// the node's log tail if it does not come up within 60 s.
    pub async fn start() -> PrivateNode {
        Self::start_inner(None).await
    }

    /// Like [`PrivateNode::start`], plus a TLS listener on 127.0.0.1 (see
    /// [`PrivateNode::amqps_url`]) presenting `tls.cert`, with peer verification
    /// off (`verify_none`, no client certificate needed).
    pub async fn start_with_tls(tls: &NodeTls) -> PrivateNode {
        Self::start_inner(Some(tls)).await
    }

    async fn start_inner(tls: Option<&NodeTls>) -> PrivateNode {
        // A port that looked free may be grabbed by someone else before the
        // node binds it; such a node dies with `eaddrinuse`, so try again.
        for _ in 0..3 {
            match Self::try_start(tls).await {
                Ok(node) => return node,
                Err(node) => {
                    eprintln!(
                        "private node {} lost its port {} to someone else; retrying",
                        node.name, node.port
                    );
                    drop(node);
                }
            }
        }
        panic!("private RabbitMQ node: ports kept being taken, gave up after 3 attempts");
    }

    /// `Err` only when the node died because its port was taken; any other
    /// failure panics.
    async fn try_start(tls: Option<&NodeTls>) -> Result<PrivateNode, PrivateNode> {
        let port = pick_ports();
        // A pair of its own too, though only the port itself is used: it keeps the
        // two listeners of this process's nodes apart.
        let tls_port = tls.map(|_| pick_ports());
        let n = NODE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "itpn-{}-{n}-{:08x}@localhost",
            std::process::id(),
            fastrand::u32(..)
        );
        let dir = std::env::temp_dir().join(name.replace('@', "-"));
        // From here on Drop cleans up, whatever happens.
        let node = PrivateNode {
            name,
            port,
            dir,
            tls_port,
        };
        // The ports stay reserved until the node is dropped: a node killed or shut
        // down by a test is started again on the same ones (see [`PrivateNode::restart`]).
        node.prepare(tls);
        match node.launch().await {
            Ok(()) => Ok(node),
            Err(()) => Err(node),
        }
    }

    /// Writes the node's folder and config and starts its watchdog; once per node.
    fn prepare(&self, tls: Option<&NodeTls>) {
        let dir = &self.dir;
        std::fs::create_dir_all(dir.join("mnesia")).expect("create node mnesia dir");
        std::fs::create_dir_all(dir.join("log")).expect("create node log dir");
        std::fs::write(dir.join("plugins"), "[].\n").expect("write enabled plugins file");
        // Our own config file: the system one (/etc/rabbitmq/rabbitmq.conf)
        // would add a listener on 5672, which the shared broker holds.
        let mut config = format!("listeners.tcp.local = 127.0.0.1:{}\n", self.port);
        if let (Some(tls), Some(tls_port)) = (tls, self.tls_port) {
            config.push_str(&self.write_tls_files(tls, tls_port));
        }
        std::fs::write(dir.join("rabbitmq.conf"), config).expect("write node config file");
        // Also the TLS files: the node reads them as `rabbitmq`.
        chown_to_rabbitmq(dir);
        self.spawn_watchdog();
    }

    /// Runs `rabbitmq-server -detached` and waits until the node has fully booted.
    /// `Err` only when it died because its port was taken; any other failure panics
    /// with the node's log tail.
    async fn launch(&self) -> Result<(), ()> {
        // A pid file left by a killed VM would read as "died while starting".
        let _ = std::fs::remove_file(self.pid_file());
        let started = Instant::now();
        let output = run_bounded(
            Command::new(tool("rabbitmq-server"))
                .arg("-detached")
                .envs(self.server_env())
                .current_dir("/"),
            CTL_TIMEOUT,
        )
        .await
        .unwrap_or_else(|e| panic!("rabbitmq-server -detached for {}: {e}", self.name));
        assert!(
            output.status.success(),
            "rabbitmq-server -detached for {} failed: {}",
            self.name,
            describe(&output)
        );

        // Right after -detached the node is not reachable yet and
        // await_startup fails at once; retry until it answers.
        let deadline = started + STARTUP;
        let mut last = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "private RabbitMQ node {} (amqp port {}) did not start within {STARTUP:?}; \
                     last await_startup: {last}\n--- log tail ---\n{}",
                    self.name,
                    self.port,
                    self.log_tail()
                );
            }
            let secs = left.as_secs().max(1).to_string();
            match self
                .ctl_output(
                    &["await_startup", "--timeout", &secs],
                    left + Duration::from_secs(5),
                )
                .await
            {
                Ok(output) if output.status.success() => break,
                Ok(output) => last = describe(&output),
                Err(e) => last = e,
            }
            if self.died() {
                let log = self.log_tail();
                if log.contains("eaddrinuse") {
                    return Err(());
                }
                panic!(
                    "private RabbitMQ node {} (amqp port {}) died while starting; \
                     last await_startup: {last}\n--- log tail ---\n{log}",
                    self.name, self.port
                );
            }
            sleep(Duration::from_millis(250)).await;
        }
        let tls = self
            .tls_port
            .map(|p| format!(" (TLS on 127.0.0.1:{p})"))
            .unwrap_or_default();
        eprintln!(
            "private RabbitMQ node {} up on 127.0.0.1:{}{tls} in {:.1?}",
            self.name,
            self.port,
            started.elapsed()
        );
        Ok(())
    }

    /// Writes the TLS listener's files into the node's folder; returns the lines
    /// of `rabbitmq.conf` that use them.
    fn write_tls_files(&self, tls: &NodeTls, tls_port: u16) -> String {
        let folder = self.dir.join("tls");
        std::fs::create_dir_all(&folder).expect("create node tls dir");
        let mut lines = format!("listeners.ssl.local = 127.0.0.1:{tls_port}\n");
        for (key, file, pem) in [
            ("cacertfile", "ca.pem", &tls.ca),
            ("certfile", "cert.pem", &tls.cert),
            ("keyfile", "key.pem", &tls.key),
        ] {
            let path = folder.join(file);
            std::fs::write(&path, pem).expect("write node tls file");
            lines.push_str(&format!("ssl_options.{key} = {}\n", path.display()));
        }
        lines.push_str("ssl_options.verify = verify_none\n");
        lines.push_str("ssl_options.fail_if_no_peer_cert = false\n");
        lines
    }

    /// Drop does not run when the test process is killed (a timeout, Ctrl-C),
    /// so a detached shell polls it and shuts the node down if it goes away
    /// first. It exits by itself once Drop has removed the folder.
    fn spawn_watchdog(&self) {
        const SCRIPT: &str = r#"
            while kill -0 "$1" 2>/dev/null && [ -d "$2" ]; do sleep 1; done
            [ -d "$2" ] || exit 0
            timeout 60 "$4" -n "$3" shutdown >/dev/null 2>&1
            rm -rf "$2"
        "#;
        // `setsid -f` forks the watchdog into its own session (out of reach of
        // the test's process group) and returns at once.
        let status = StdCommand::new("setsid")
            .args(["-f", "sh", "-c", SCRIPT, "private-node-watchdog"])
            .arg(std::process::id().to_string())
            .arg(&self.dir)
            .arg(&self.name)
            .arg(tool("rabbitmqctl"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("spawn private node watchdog");
        assert!(status.success(), "setsid -f (watchdog) failed: {status}");
    }

    fn server_env(&self) -> Vec<(&'static str, String)> {
        let dir = self.dir.display();
        vec![
            ("RABBITMQ_NODENAME", self.name.clone()),
            ("RABBITMQ_NODE_PORT", self.port.to_string()),
            ("RABBITMQ_DIST_PORT", (self.port + DIST_OFFSET).to_string()),
            ("RABBITMQ_MNESIA_BASE", format!("{dir}/mnesia")),
            ("RABBITMQ_LOG_BASE", format!("{dir}/log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", format!("{dir}/plugins")),
            ("RABBITMQ_PID_FILE", format!("{dir}/pid")),
            ("RABBITMQ_CONFIG_FILE", format!("{dir}/rabbitmq.conf")),
            // Does not exist: keeps a system advanced.config out too.
            (
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                format!("{dir}/advanced.config"),
            ),
        ]
    }

    /// Erlang node name, e.g. `itpn-123-0-1a2b3c4d@localhost`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's folder (mnesia, log, pid file, config).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// OS pid of the node's Erlang VM, from its pid file.
    pub fn os_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn amqp_port(&self) -> u16 {
        self.port
    }

    pub fn amqp_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// guest/guest on the default vhost (guest may log in from localhost).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The TLS listener's port; panics if the node was started without one.
    pub fn amqps_port(&self) -> u16 {
        self.tls_port
            .unwrap_or_else(|| panic!("private node {} has no TLS listener", self.name))
    }

    /// guest/guest on the default vhost over TLS, to `localhost` (a name the
    /// server certificate must hold; it resolves to 127.0.0.1, so guest may log in).
    pub fn amqps_url(&self) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.amqps_port())
    }

    /// `RABBITMQ_PID_FILE`: the VM writes its OS pid there.
    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// Whether the node's VM is alive (by the pid in its pid file).
    pub fn is_running(&self) -> bool {
        self.os_pid().is_some_and(Self::pid_alive)
    }

    /// Kills the node's VM with SIGKILL, by the pid in its pid file (no goodbye to
    /// clients or to the other nodes of a cluster), and waits until it is gone.
    pub fn kill9(&self) {
        let pid = self
            .os_pid()
            .unwrap_or_else(|| panic!("private node {} has no pid file", self.name));
        assert!(
            kill_vm(pid),
            "private node {} (pid {pid}) still alive after SIGKILL",
            self.name
        );
    }

    /// Stops the node's VM in order (`rabbitmqctl shutdown`, which waits until the VM
    /// has exited). [`PrivateNode::restart`] starts it again.
    pub async fn shutdown(&self) {
        self.rabbitmqctl(&["shutdown"]).await;
    }

    /// Starts the VM of a node that was killed or shut down again, with the same name,
    /// ports and data (so a cluster member rejoins its cluster), and waits until it
    /// has fully booted. Panics if its port was taken meanwhile.
    pub async fn restart(&self) {
        assert!(
            !self.is_running(),
            "private node {} is still running",
            self.name
        );
        if self.launch().await.is_err() {
            panic!(
                "private node {} could not start again: its port {} was taken",
                self.name, self.port
            );
        }
    }

    /// Stops the RabbitMQ application (the VM stays up): clients lose their
    /// connections and the AMQP port refuses new ones.
    pub async fn stop_app(&self) {
        self.rabbitmqctl(&["stop_app"]).await;
    }

    /// Starts the application again and waits until it has fully booted.
    pub async fn start_app(&self) {
        self.rabbitmqctl(&["start_app"]).await;
        let secs = STARTUP.as_secs().to_string();
        self.rabbitmqctl(&["await_startup", "--timeout", &secs])
            .await;
    }

    /// Raises (`true`) or clears (`false`) the memory alarm via the memory
    /// high watermark, and waits until the node reports it so.
    pub async fn set_memory_alarm(&self, on: bool) {
        let watermark = if on {
            WATERMARK_ALARM
        } else {
            WATERMARK_DEFAULT
        };
        self.rabbitmqctl(&["set_vm_memory_high_watermark", watermark])
            .await;
        let deadline = Instant::now() + ALARM_TIMEOUT;
        loop {
            let alarms = self.alarms().await;
            if alarms.contains("resource_limit,memory") == on {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "memory alarm on {} still {} after {ALARM_TIMEOUT:?}: {alarms}",
                self.name,
                if on { "off" } else { "on" }
            );
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node's active alarms as an Erlang term, e.g.
    /// `[{{resource_limit,memory,'n@localhost'},[]}]`.
    pub async fn alarms(&self) -> String {
        self.rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."])
            .await
    }

    /// Runs `rabbitmqctl -n <node> args`, asserts it succeeded, returns stdout.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> String {
        let output = self
            .ctl_output(args, CTL_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("rabbitmqctl -n {} {args:?}: {e}", self.name));
        assert!(
            output.status.success(),
            "rabbitmqctl -n {} {args:?} failed: {}",
            self.name,
            describe(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    async fn ctl_output(&self, args: &[&str], limit: Duration) -> Result<Output, String> {
        Self::ctl_output_for(&self.name, args, limit).await
    }

    async fn ctl_output_for(name: &str, args: &[&str], limit: Duration) -> Result<Output, String> {
        run_bounded(
            Command::new(tool("rabbitmqctl"))
                .arg("-n")
                .arg(name)
                .args(args)
                .current_dir("/"),
            limit,
        )
        .await
    }

    /// Whether a node of that name answers `rabbitmqctl status` — to check
    /// after drop that it is really gone.
    pub async fn responds(name: &str) -> bool {
        Self::ctl_output_for(name, &["status"], CTL_TIMEOUT)
            .await
            .is_ok_and(|output| output.status.success())
    }

    /// Whether an OS process with that pid is alive (zombies count as dead).
    pub fn pid_alive(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Format: `pid (comm) state ...`; comm may contain spaces.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }

    /// True once the pid file names a process that no longer exists.
    fn died(&self) -> bool {
        self.os_pid().is_some_and(|pid| !Self::pid_alive(pid))
    }

    /// Last lines of the node's main log (plus a crash dump slogan, if any).
    pub fn log_tail(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.name));
        let mut tail = match std::fs::read_to_string(&log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", log.display()),
        };
        let dump = self.dir.join("log").join("erl_crash.dump");
        if let Ok(text) = std::fs::read_to_string(dump)
            && let Some(slogan) = text.lines().find(|l| l.starts_with("Slogan:"))
        {
            tail.push_str("\nerl_crash.dump ");
            tail.push_str(slogan);
        }
        tail
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        let pid = self.os_pid();
        if pid.is_some_and(Self::pid_alive) {
            let mut command = StdCommand::new(tool("rabbitmqctl"));
            command
                .args(["-n", &self.name, "shutdown"])
                .current_dir("/");
            if let Err(e) = run_blocking_bounded(&mut command, CTL_TIMEOUT) {
                eprintln!("rabbitmqctl -n {} shutdown: {e}", self.name);
            }
        }
        // Last resort for a node that would not shut down: kill its VM, by
        // the pid it wrote itself.
        if let Some(pid) = pid.filter(|&pid| Self::pid_alive(pid)) {
            eprintln!("private node {} still alive; killing pid {pid}", self.name);
            kill_vm(pid);
        }
        release_ports(self.port);
        if let Some(tls_port) = self.tls_port {
            release_ports(tls_port);
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("removing {}: {e}", self.dir.display());
        }
    }
}

/// Sends SIGKILL to `pid` and waits up to 10 s for it to be gone; whether it is.
fn kill_vm(pid: u32) -> bool {
    let _ = StdCommand::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while PrivateNode::pid_alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    !PrivateNode::pid_alive(pid)
}

/// Prefers the `/usr/sbin` wrapper (see the module docs on the cookie).
fn tool(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from(name)
    }
}

/// Runs a command to completion, killing it if it takes longer than `limit`.
async fn run_bounded(command: &mut Command, limit: Duration) -> Result<Output, String> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot spawn: {e}"))?;
    match timeout(limit, child.wait_with_output()).await {
        Ok(result) => result.map_err(|e| format!("wait failed: {e}")),
        Err(_) => Err(format!("timed out after {limit:?}")),
    }
}

/// Blocking variant for Drop: runs `command`, killing it after `limit`.
fn run_blocking_bounded(command: &mut StdCommand, limit: Duration) -> Result<(), String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot spawn: {e}"))?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                return Err(format!("{status}: {}", stderr.trim()));
            }
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("wait failed: {e}")),
        }
    }
}

fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

/// The node runs as `rabbitmq` (the wrapper drops to it when run as root), so
/// it must own its folder.
fn chown_to_rabbitmq(dir: &Path) {
    let status = StdCommand::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(dir)
        .status()
        .expect("run chown");
    assert!(
        status.success(),
        "chown -R rabbitmq:rabbitmq {} failed: {status}",
        dir.display()
    );
}

/// An AMQP port `p` with `p` and `p + 20000` both free on 127.0.0.1 and not
/// handed out to another node of this process; release with [`release_ports`].
fn pick_ports() -> u16 {
    let mut taken = TAKEN_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let taken = taken.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = fastrand::u16(PORT_RANGE);
        if taken.contains(&port) {
            continue;
        }
        let free = |p: u16| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok();
        if free(port) && free(port + DIST_OFFSET) {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port pair p, p+{DIST_OFFSET} found in {PORT_RANGE:?}");
}

fn release_ports(port: u16) {
    if let Some(taken) = TAKEN_PORTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
    {
        taken.remove(&port);
    }
}
