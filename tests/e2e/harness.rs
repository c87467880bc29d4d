//! A real `spanlake serve` process on free ports with a temporary data directory, and the
//! clients the tests use to talk to it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Path of the repository root.
pub fn repo_root() -> PathBuf {
    manifest_dir()
}

/// The shared fixtures directory.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("SPANLAKE_FIXTURES")
        .map_or_else(|| repo_root().join("../shared/fixtures"), PathBuf::from)
}

/// The Python interpreter of the test virtualenv (see `scripts/test`).
pub fn python() -> PathBuf {
    std::env::var_os("SPANLAKE_PYTHON")
        .map_or_else(|| repo_root().join(".venv/bin/python"), PathBuf::from)
}

/// Runs a Python snippet with the test virtualenv and returns its stdout; panics with its
/// stderr when it fails.
pub fn run_python(code: &str, args: &[&str]) -> String {
    let out = Command::new(python()).arg("-c").arg(code).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {} (run scripts/test to create it): {e}", python().display())
    });
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A free TCP port on localhost, below the kernel's ephemeral range (32768 and up), each
/// handed out once per test process: a server restarted on its ports (crash tests) cannot lose
/// one to a connection or a `bind(0)` elsewhere that the kernel numbers from the ephemeral range.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + std::process::id() % 8_000,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + (n - 20_000) % 12_000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

/// The spanlake binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_spanlake")
}

/// A running server.
pub struct TestServer {
    child: Option<Child>,
    /// Data directory (kept across restarts).
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    /// OTLP/HTTP, SQL and API port.
    pub http_port: u16,
    /// OTLP/gRPC port.
    pub grpc_port: u16,
    /// Postgres wire protocol port.
    pub pg_port: u16,
    /// Arrow Flight SQL port.
    pub flight_port: u16,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    https: bool,
    log: PathBuf,
}

/// How to start a server.
#[derive(Debug, Default, Clone)]
pub struct ServerOptions {
    /// Extra command-line arguments after `serve`.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Data directory to use instead of a fresh temporary one.
    pub data_dir: Option<PathBuf>,
    /// The HTTP listener speaks TLS (readiness is checked with `curl -k`).
    pub https: bool,
}

impl TestServer {
    /// Starts a server on a fresh temporary data directory.
    pub fn start() -> Self {
        Self::start_with(ServerOptions::default())
    }

    /// Starts a server with extra options.
    pub fn start_with(options: ServerOptions) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = options.data_dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
        let log = tmp.path().join("server.log");
        let mut s = Self {
            child: None,
            dir: dir.clone(),
            _tmp: Some(tmp),
            http_port: free_port(),
            grpc_port: free_port(),
            pg_port: free_port(),
            flight_port: free_port(),
            extra: options.args,
            env: options.env,
            https: options.https,
            log,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let env = self.env.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(binary());
        cmd.arg("--data-dir")
            .arg(&self.dir)
            .arg("--log")
            .arg("info,spanlake_engine=debug")
            .arg("serve")
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .arg("--grpc-listen")
            .arg(format!("127.0.0.1:{}", self.grpc_port))
            .arg("--pg-listen")
            .arg(format!("127.0.0.1:{}", self.pg_port))
            .arg("--flight-listen")
            .arg(format!("127.0.0.1:{}", self.flight_port))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start spanlake"));
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = reqwest::blocking::Client::new();
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("spanlake exited during start ({status}):\n{}", self.log_text());
            }
            let healthy = if self.https {
                Command::new("curl")
                    .args(["-k", "-s", "-f", "-o", "/dev/null"])
                    .arg(format!("https://127.0.0.1:{}/health", self.http_port))
                    .status()
                    .is_ok_and(|s| s.success())
            } else {
                client.get(self.url("/health")).send().is_ok_and(|r| r.status().is_success())
            };
            if healthy {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("spanlake did not become healthy:\n{}", self.log_text());
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// The OTLP/gRPC endpoint.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// Runs SQL through `POST /v1/sql` and returns the JSON answer; panics unless it is 200.
    pub fn sql(&self, sql: &str) -> Value {
        let (status, body) = self.sql_status(sql);
        assert_eq!(status, 200, "{sql}: {body}");
        body
    }

    /// The rows of a query.
    pub fn rows(&self, sql: &str) -> Vec<Vec<Value>> {
        let body = self.sql(sql);
        serde_json::from_value(body["rows"].clone()).expect("rows")
    }

    /// The single value of a one-row, one-column query.
    pub fn scalar(&self, sql: &str) -> Value {
        let rows = self.rows(sql);
        assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
        rows[0][0].clone()
    }

    /// Runs SQL and returns the status and the JSON body.
    pub fn sql_status(&self, sql: &str) -> (u16, Value) {
        let resp = reqwest::blocking::Client::new()
            .post(self.url("/v1/sql"))
            .json(&serde_json::json!({ "sql": sql }))
            .send()
            .expect("POST /v1/sql");
        let status = resp.status().as_u16();
        (status, resp.json().expect("JSON body"))
    }

    /// Posts an OTLP/HTTP body.
    pub fn post_traces(
        &self,
        content_type: &str,
        body: Vec<u8>,
        encoding: Option<&str>,
    ) -> (u16, Vec<u8>) {
        let mut req = reqwest::blocking::Client::new()
            .post(self.url("/v1/traces"))
            .header("content-type", content_type)
            .body(body);
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        let resp = req.send().expect("POST /v1/traces");
        let status = resp.status().as_u16();
        (status, resp.bytes().expect("body").to_vec())
    }

    /// Stops the server with SIGTERM and waits for it to flush and exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(
                        status.success(),
                        "spanlake exited with {status}:\n{}",
                        self.log_text()
                    );
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("spanlake did not stop:\n{}", self.log_text());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills the server with SIGKILL (no flush, no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data directory and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the server first");
        self.spawn();
    }

    /// Starts the server again with an empty local data directory (no WAL, no node id), as a
    /// replacement node would; the data location must be given separately (`--location`).
    pub fn restart_on_empty_disk(&mut self, dir: PathBuf) {
        assert!(self.child.is_none(), "stop or kill the server first");
        self.dir = dir;
        self.spawn();
    }

    /// Waits for the server process to exit by itself (e.g. at a crash point).
    pub fn wait_exit(&mut self) {
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            panic!("spanlake did not exit:\n{}", self.log_text());
        }
    }

    /// Polls `cond` every 50 ms for up to 60 s; panics with `what` and the log if it never holds.
    pub fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}:\n{}", self.log_text());
    }

    /// Runs `spanlake <args>` on this server's data directory and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.cli_status(args);
        assert!(code == 0, "spanlake {args:?} failed: {stderr}");
        stdout
    }

    /// Runs the CLI on the server's data directory; returns exit code, stdout and stderr.
    pub fn cli_status(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(binary())
            .arg("--data-dir")
            .arg(&self.dir)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run spanlake");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("server running")
    }

    /// A line of `/proc/PID/status` in kB (`VmHWM`: peak RSS, `VmRSS`: current).
    pub fn proc_status_kb(&self, key: &str) -> u64 {
        let text =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .strip_prefix(':')?
                    .trim()
                    .strip_suffix(" kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{key} not in /proc status"))
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Reads `/metrics` and returns one metric's value (label-free names or `name{label="x"}`).
    pub fn metric(&self, name: &str) -> f64 {
        let text =
            reqwest::blocking::get(self.url("/metrics")).and_then(|r| r.text()).expect("metrics");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real S3-compatible server (moto, from PyPI; installed into .venv by scripts/test) with
/// one bucket, for as long as the value lives.
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket created at start.
    pub bucket: String,
}

impl S3Server {
    /// Starts the server and creates `bucket`.
    pub fn start(bucket: &str) -> Self {
        let port = free_port();
        let moto = python().with_file_name("moto_server");
        let child = Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e} (run scripts/test)", moto.display()));
        let endpoint = format!("http://127.0.0.1:{port}");
        let client = reqwest::blocking::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // moto checks no signatures: a plain PUT creates the bucket.
            match client.put(format!("{endpoint}/{bucket}")).send() {
                Ok(r) if r.status().is_success() => break,
                _ if Instant::now() > deadline => panic!("moto did not start on {endpoint}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        Self { child, endpoint, bucket: bucket.to_string() }
    }

    /// The environment that points spanlake (or any AWS SDK) at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Keys of the objects under `prefix` (moto's ListObjectsV2, unsigned).
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let body = reqwest::blocking::get(format!(
            "{}/{}?list-type=2&prefix={prefix}&max-keys=10000",
            self.endpoint, self.bucket
        ))
        .and_then(|r| r.text())
        .expect("list objects");
        body.split("<Key>")
            .skip(1)
            .filter_map(|p| p.split("</Key>").next())
            .map(String::from)
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The package directory: from the environment `cargo test` sets when it runs the test (a
/// target directory shared by clones at different paths may hold a binary built elsewhere),
/// else where it was compiled.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        std::path::PathBuf::from,
    )
}
