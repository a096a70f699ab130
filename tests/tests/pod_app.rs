//! pod-app on its own, over loopback in a private network namespace per test: the echo
//! protocol, verification, a thousand concurrent connections, and clear failures.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    process::{Child, Command, Stdio},
};

use nodemesh_testbed::{ClientReport, SendReport};

const POD_APP: &str = env!("CARGO_BIN_EXE_pod-app");

/// Moves the test's thread into a fresh, anonymous network namespace with loopback up, so its
/// traffic never touches the machine's own. Processes spawned from this thread inherit it; it
/// vanishes with them and the thread.
fn private_netns() {
    nodemesh_testbed::require_root().expect("root");
    // SAFETY: unshare changes only this thread's network namespace.
    let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(unshared, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    let up = Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("ip");
    assert!(up.success(), "bringing lo up");
}

/// A `pod-app serve` on an ephemeral port, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Server {
        Server::start_mode("serve")
    }

    fn start_mode(mode: &str) -> Server {
        let mut child = Command::new(POD_APP)
            .args([mode, "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("pod-app serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        let netns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("netns link");
        assert_ne!(netns(&child.id().to_string()), netns("self"), "the server is not in the machine's netns");
        let port = line.trim().strip_prefix("LISTENING ").and_then(|p| p.parse().ok());
        Server { port: port.unwrap_or_else(|| panic!("unexpected first line {line:?}")), child }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(args: &[&str]) -> ClientReport {
    let output = Command::new(POD_APP).arg("client").args(args).output().expect("pod-app client");
    assert!(output.status.success(), "client exits 0 even when connections fail: {output:?}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&output.stdout)))
}

#[test]
fn client_verifies_the_echo_and_reports_the_peer_the_server_saw() {
    private_netns();
    let server = Server::start();
    let to = format!("127.0.0.1:{}", server.port);
    let report = client(&["--to", &to, "--bytes", "3000017", "--conns", "3", "--seed", "9"]);
    assert!(report.ok, "{report:?}");
    assert_eq!((report.conns, report.succeeded, report.failed), (3, 3, 0));
    assert_eq!((report.bytes_sent, report.bytes_received), (3 * 3_000_017, 3 * 3_000_017));
    assert_eq!(report.peer_ips(), ["127.0.0.1"]);
    assert!(report.errors.is_empty());
}

#[test]
fn a_thousand_concurrent_connections_complete() {
    private_netns();
    let server = Server::start();
    let to = format!("127.0.0.1:{}", server.port);
    let report = client(&["--to", &to, "--bytes", "65536", "--conns", "1200"]);
    assert!(report.ok, "{} failed: {:?}", report.failed, report.errors);
    assert_eq!(report.bytes_received, 1200 * 65536);
}

#[test]
fn a_zero_byte_transfer_succeeds() {
    private_netns();
    let server = Server::start();
    let to = format!("127.0.0.1:{}", server.port);
    let report = client(&["--to", &to, "--bytes", "0", "--conns", "2"]);
    assert!(report.ok, "{report:?}");
    assert_eq!(report.bytes_received, 0);
}

#[test]
fn refused_connections_are_reported_not_fatal() {
    private_netns();
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let report = client(&["--to", &format!("127.0.0.1:{port}"), "--conns", "7"]);
    assert!(!report.ok);
    assert_eq!((report.succeeded, report.failed), (0, 7));
    assert!(!report.errors.is_empty() && report.errors.len() <= 5, "first few errors: {:?}", report.errors);
    assert!(report.errors[0].contains("refused"), "{:?}", report.errors);
}

#[test]
fn a_server_that_is_not_pod_app_is_a_clear_failure() {
    private_netns();
    // Accepts and says something else first.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let talker = std::thread::spawn(move || {
        use std::io::Write as _;
        let (mut stream, _) = listener.accept().expect("accept");
        let _ = stream.write_all(b"HELLO\n");
    });
    let report = client(&["--to", &format!("127.0.0.1:{port}"), "--connect-timeout-ms", "2000"]);
    talker.join().expect("talker");
    assert!(!report.ok);
    assert!(report.errors[0].contains("PEER"), "{:?}", report.errors);
}

#[test]
fn bad_arguments_fail_with_a_message_not_a_panic() {
    private_netns();
    for args in [
        &["client", "--to", "not-an-address"][..],
        &["client", "--to", "127.0.0.1:1", "--bytes", "-5"],
        &["serve", "--port", "70000"],
        &["serve"],
        &["dance"],
    ] {
        let output = Command::new(POD_APP).args(args).output().expect("pod-app");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} must fail");
        assert!(!stderr.contains("panicked") && !stderr.trim().is_empty(), "{args:?}: {stderr}");
    }
    // A port already in use: an error naming the port.
    let taken = TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let output = Command::new(POD_APP).args(["serve", "--port", &port]).output().expect("pod-app");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains(&port) && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn send_streams_for_a_while_and_the_sink_verifies_every_byte() {
    private_netns();
    let sink = Server::start_mode("sink");
    let to = format!("127.0.0.1:{}", sink.port);
    let output = Command::new(POD_APP)
        .args(["send", "--to", &to, "--conns", "4", "--duration-ms", "300"])
        .output()
        .expect("pod-app send");
    assert!(output.status.success(), "{output:?}");
    let report: SendReport = serde_json::from_slice(&output.stdout).expect("report");
    assert!(report.ok, "{report:?}");
    assert_eq!((report.conns, report.succeeded, report.failed), (4, 4, 0));
    assert_eq!(report.bytes_verified, report.bytes_sent);
    assert!(report.bytes_sent > 4 * 1024 * 1024, "300 ms over loopback moves megabytes: {report:?}");
    assert!(report.elapsed_us >= 300_000, "{report:?}");
}

#[test]
fn the_sink_rejects_bytes_that_are_not_the_pattern() {
    use std::io::{Read as _, Write as _};
    private_netns();
    let sink = Server::start_mode("sink");
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", sink.port)).expect("connect");
    let mut data = b"SEND 5\n".to_vec();
    data.extend(nodemesh_testbed::payload::prefix(6, 4096));
    stream.write_all(&data).expect("write");
    stream.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut verdict = String::new();
    stream.read_to_string(&mut verdict).expect("verdict");
    assert_eq!(verdict, "BAD 0\n");
}
