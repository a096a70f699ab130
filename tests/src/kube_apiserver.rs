//! A real kube-apiserver with its own etcd on loopback, for tests of nodemesh's Kubernetes
//! discovery: the same API, watch semantics, RBAC and status subresources a cluster has, without
//! a cluster.
//!
//! The binary is Kubernetes v1.20.2 built from Debian's source package by
//! `cargo xtask kube-apiserver` (the xtask's `kube_apiserver` module); etcd is Debian's
//! `etcd-server` 3.4. Limits of this tier: Kubernetes 1.20 (EndpointSlice only as v1beta1), and no
//! controllers or kubelet run, so pods stay Pending unless a test patches their status, deleting a
//! pod on a node waits for a kubelet unless the grace period is 0, and the ServiceAccount admission
//! plugin is off (no controller creates the `default` account it would demand): pods keep the
//! `serviceAccountName` they are given.

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The variable `cargo xtask test` sets to the built binary's path.
pub const ENV_VAR: &str = "NODEMESH_KUBE_APISERVER";
/// The version `cargo xtask kube-apiserver` builds (and the cache directory's name).
pub const VERSION: &str = "v1.20.2";
/// Each server's state: `<this>/<name>`, removed at start and on drop.
const STATE_ROOT: &str = "/tmp/nodemesh-kube";
/// A cold start takes ~5–15 s here; this leaves room for a loaded CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of each log quoted when the server does not come up.
const LOG_TAIL_LINES: usize = 15;
/// The range Services get their cluster IPs from.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// A user the server authenticates by bearer token: a line of its `--token-auth-file`. Groups
/// are what RBAC bindings name (`system:authenticated` is added by the server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenUser {
    pub name: String,
    pub groups: Vec<String>,
    pub token: String,
}

impl TokenUser {
    /// Returns a user with a fresh random token.
    pub fn new(name: &str, groups: &[&str]) -> Self {
        TokenUser {
            name: name.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            token: random_token(),
        }
    }
}

/// Returns 32 random hex digits (tokens only need to be unguessable by other local tests).
fn random_token() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `len` bytes into the buffer we own.
    let filled = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if filled != bytes.len() as isize {
        // Never on Linux ≥ 3.17; a per-process random hash is still unique enough here.
        use std::hash::{BuildHasher as _, Hasher as _};
        for chunk in bytes.chunks_mut(8) {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u32(std::process::id());
            chunk.copy_from_slice(&hasher.finish().to_le_bytes()[..chunk.len()]);
        }
    }
    bytes.iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// A running kube-apiserver and its etcd, both started by this process, on 127.0.0.1 only.
///
/// Dropping it (also when a test panics) stops both by PID, waits for them and removes its
/// directory; if a test panicked the logs are kept and their path printed. Both processes also
/// get SIGKILL if the thread that started them dies without dropping it (a killed test binary),
/// and [`KubeApiServer::start`] ends what a crashed earlier run of the same name left. Because of
/// that, start it on the thread that keeps it (a test's own), not in a `spawn_blocking` task or
/// a static shared across tests.
pub struct KubeApiServer {
    name: String,
    dir: PathBuf,
    url: String,
    admin: TokenUser,
    ca_pem: String,
    kubeconfig: PathBuf,
    /// Stopped in this order: the API server first, so it never sees etcd vanish.
    children: Vec<(&'static str, Child)>,
    /// Keeps the logs on drop: set when starting failed or the test panicked.
    keep_logs: bool,
}

impl std::fmt::Debug for KubeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApiServer").field("name", &self.name).field("url", &self.url).finish()
    }
}

impl KubeApiServer {
    /// Starts etcd and kube-apiserver with only the admin user (group `system:masters`), and
    /// waits until `/readyz` answers.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_with_users(name, &[])
    }

    /// Starts them with `users` in the token file beside the admin, for RBAC tests (the token
    /// file is read once, at start).
    pub fn start_with_users(name: &str, users: &[TokenUser]) -> anyhow::Result<Self> {
        check_name(name)?;
        let binary = find_binary()?;
        let etcd = find_etcd()?;
        let dir = Path::new(STATE_ROOT).join(name);
        sweep(&dir)?;
        fs::create_dir_all(dir.join("etcd")).with_context(|| format!("creating {}", dir.display()))?;

        let certs = write_certificates(&dir)?;
        let admin = TokenUser::new("nodemesh-admin", &["system:masters"]);
        let all_users: Vec<&TokenUser> = std::iter::once(&admin).chain(users).collect();
        let tokens = dir.join("tokens.csv");
        fs::write(&tokens, token_file(&all_users)?)
            .with_context(|| format!("writing {}", tokens.display()))?;

        let [etcd_port, peer_port, api_port] = free_ports()?;
        let url = format!("https://127.0.0.1:{api_port}");
        let mut server = KubeApiServer {
            name: name.to_owned(),
            kubeconfig: dir.join("kubeconfig"),
            dir,
            url,
            admin,
            ca_pem: certs.ca_pem,
            children: Vec::new(),
            keep_logs: false,
        };
        // From here on, a failure drops `server`, which stops what was started and keeps the logs.
        match server.launch(&binary, &etcd, &certs.files, &tokens, [etcd_port, peer_port, api_port]) {
            Ok(()) => Ok(server),
            Err(err) => {
                server.keep_logs = true;
                Err(err)
            }
        }
    }

    /// Starts etcd, then kube-apiserver, waits for it, and writes the admin kubeconfig.
    fn launch(
        &mut self,
        binary: &Path,
        etcd: &Path,
        certs: &CertificateFiles,
        tokens: &Path,
        [etcd_port, peer_port, api_port]: [u16; 3],
    ) -> anyhow::Result<()> {
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(etcd);
        cmd.arg("--name=nodemesh")
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=nodemesh={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr");
        self.spawn("etcd", &mut cmd)?;
        self.wait_for_port(etcd_port, "etcd")?;

        let mut cmd = Command::new(binary);
        cmd.arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={api_port}"))
            // 1.20 still serves plain HTTP on 127.0.0.1:8080 by default: off, it would clash.
            .arg("--insecure-port=0")
            .arg(format!("--tls-cert-file={}", certs.serving_cert.display()))
            .arg(format!("--tls-private-key-file={}", certs.serving_key.display()))
            // Unused since the files above are given, but kept inside our directory.
            .arg(format!("--cert-dir={}", self.dir.join("certs").display()))
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", certs.service_account_public_key.display()))
            .arg(format!("--service-account-signing-key-file={}", certs.service_account_key.display()))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--disable-admission-plugins=ServiceAccount")
            // As every real cluster (kubeadm, kind) runs it: mesh-node's DaemonSet is privileged.
            .arg("--allow-privileged=true")
            .arg("--profiling=false")
            .arg("--logtostderr=true")
            .arg("--v=1");
        self.spawn("kube-apiserver", &mut cmd)?;
        self.wait_ready()?;
        fs::write(&self.kubeconfig, self.kubeconfig_text(&self.admin))
            .with_context(|| format!("writing {}", self.kubeconfig.display()))
    }

    /// Returns the API server's URL, `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Returns the admin user (group `system:masters`, which every authorizer lets through).
    pub fn admin(&self) -> &TokenUser {
        &self.admin
    }

    /// Returns the admin's bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin.token
    }

    /// Returns the PEM of the CA that signed the serving certificate (for 127.0.0.1, localhost
    /// and the in-cluster names), so clients verify the server rather than trusting anything.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Returns the CA's file, for tools that want a path (kubectl's `--certificate-authority`).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Returns the admin's kubeconfig (`KUBECONFIG=… kubectl get pods -A`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig for `user` into the server's directory and returns its path.
    pub fn write_kubeconfig(&self, user: &TokenUser) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("kubeconfig-{}", file_safe(&user.name)));
        fs::write(&path, self.kubeconfig_text(user))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Returns the directory holding the logs, certificates, tokens and etcd's data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns a client authenticated as the admin. Must be called inside a Tokio runtime (the
    /// client spawns its connection tasks there).
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        self.client_with_token(&self.admin.token)
    }

    /// Returns a client that sends `token` (a [`TokenUser`]'s, or any other to test rejection).
    pub fn client_with_token(&self, token: &str) -> anyhow::Result<kube::Client> {
        let mut config = kube::Config::new(self.url.parse().context("the server URL")?);
        config.root_cert = Some(vec![pem_to_der(&self.ca_pem)?]);
        config.auth_info.token = Some(token.to_owned().into());
        config.default_namespace = "default".to_owned();
        kube::Client::try_from(config).context("building a kube client")
    }

    /// Stops both processes and removes the directory (what dropping does, named).
    pub fn stop(self) {}

    fn kubeconfig_text(&self, user: &TokenUser) -> String {
        kubeconfig(&self.url, &self.ca_path(), user)
    }

    /// Starts `cmd` with its output in `<dir>/<name>.log` and its PID in `<dir>/<name>.pid`.
    fn spawn(&mut self, name: &'static str, cmd: &mut Command) -> anyhow::Result<()> {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                // Dies with the thread that started it, if that thread never gets to drop us.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child =
            cmd.spawn().with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
        let pid_file = self.dir.join(format!("{name}.pid"));
        self.children.push((name, child));
        let pid = self.children.last().map(|(_, c)| c.id()).unwrap_or_default();
        fs::write(&pid_file, pid.to_string()).with_context(|| format!("writing {}", pid_file.display()))?;
        Ok(())
    }

    /// Fails with the logs if a process we started has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited during start ({status})\n{}", logs_tail(&self.dir));
            }
        }
        Ok(())
    }

    fn wait_for_port(&mut self, port: u16, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{what} did not listen on {addr} within {}s\n{}",
                    READY_TIMEOUT.as_secs(),
                    logs_tail(&self.dir)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Polls `/readyz` over verified TLS with the admin token until it answers 200.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let tls = Arc::new(tls_config(&self.ca_pem)?);
        let addr: SocketAddr =
            self.url.trim_start_matches("https://").parse().context("the server address")?;
        loop {
            self.check_alive()?;
            let last = match get(&tls, addr, "/readyz", &self.admin.token) {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("HTTP {status}: {}", body.lines().last().unwrap_or("")),
                Err(err) => format!("{err:#}"),
            };
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "kube-apiserver at {} was not ready within {}s (last /readyz: {last})\n{}",
                    self.url,
                    READY_TIMEOUT.as_secs(),
                    logs_tail(&self.dir)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            // Only our own children, by PID: SIGTERM, then SIGKILL after the grace period.
            crate::process::terminate(child, Duration::from_secs(10));
        }
        if self.keep_logs || std::thread::panicking() {
            // etcd's data (a 64 MB WAL) goes; the logs stay for whoever reads the failure.
            let _ = fs::remove_dir_all(self.dir.join("etcd"));
            eprintln!("kube-apiserver {:?}: logs kept in {}", self.name, self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Returns the binary: `$NODEMESH_KUBE_APISERVER`, else the xtask's cache under the target dir.
pub fn find_binary() -> anyhow::Result<PathBuf> {
    // This crate is `<workspace>/tests`; a relative CARGO_TARGET_DIR is relative to the workspace.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    locate(std::env::var_os(ENV_VAR).map(PathBuf::from), &target)
}

/// Returns `from_env` if given, else `<target>/tools/kube-apiserver-<version>/kube-apiserver`;
/// either must exist.
fn locate(from_env: Option<PathBuf>, target: &Path) -> anyhow::Result<PathBuf> {
    let build = "build it with `cargo xtask kube-apiserver` (once, 4 to 6 minutes)";
    if let Some(path) = from_env {
        if path.is_file() {
            return Ok(path);
        }
        bail!("{ENV_VAR} is {}, which does not exist: {build}", path.display());
    }
    let path = target.join("tools").join(format!("kube-apiserver-{VERSION}/kube-apiserver"));
    if path.is_file() {
        return Ok(path);
    }
    bail!("kube-apiserver {VERSION} is not built (no {ENV_VAR}, no {}): {build}", path.display())
}

/// Returns etcd: Debian's `etcd-server` installs it as /usr/bin/etcd.
fn find_etcd() -> anyhow::Result<PathBuf> {
    let on_path =
        std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    on_path.map(|dir| dir.join("etcd")).find(|p| p.is_file()).context(
        "etcd not found: `cargo xtask kube-apiserver` installs it (Debian's etcd-server), or `apt-get install etcd-server`",
    )
}

/// Names become paths and file names.
fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("kube-apiserver name {name:?}: use letters, digits, '-' and '_' only");
    }
    Ok(())
}

fn file_safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

/// Ends the processes a crashed earlier run of this name left (by the PIDs it recorded, and only
/// if they still run with this directory on their command line, so a reused PID is never hit),
/// then removes the directory.
fn sweep(dir: &Path) -> anyhow::Result<()> {
    for name in ["kube-apiserver", "etcd"] {
        let Ok(text) = fs::read_to_string(dir.join(format!("{name}.pid"))) else { continue };
        let Ok(pid) = text.trim().parse::<libc::pid_t>() else { continue };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if pid > 1 && is_ours(&cmdline, dir) {
            // SAFETY: signalling a PID we verified runs a process of this directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing the previous run's {}", dir.display()))?;
    }
    Ok(())
}

/// Returns whether a `/proc/<pid>/cmdline` names `dir` in one of its arguments.
fn is_ours(cmdline: &[u8], dir: &Path) -> bool {
    let dir = dir.as_os_str().as_encoded_bytes();
    cmdline.split(|&b| b == 0).any(|arg| arg.windows(dir.len()).any(|w| w == dir))
}

/// Returns three distinct free loopback ports (held together while choosing, so they differ).
fn free_ports() -> anyhow::Result<[u16; 3]> {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<_, _>>()
        .context("binding 127.0.0.1:0 to pick free ports")?;
    let mut ports = [0u16; 3];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// Renders `--token-auth-file`: `token,user,uid,"group1,group2"` per line.
fn token_file(users: &[&TokenUser]) -> anyhow::Result<String> {
    let mut text = String::new();
    for user in users {
        let fields = std::iter::once(&user.name).chain(&user.groups).chain(std::iter::once(&user.token));
        if let Some(bad) = fields.clone().find(|f| f.is_empty() || f.contains([',', '"', '\n'])) {
            bail!("token user {:?}: {bad:?} must be non-empty without commas, quotes or newlines", user.name);
        }
        let _ = writeln!(text, "{},{},{},\"{}\"", user.token, user.name, user.name, user.groups.join(","));
    }
    Ok(text)
}

/// Renders a kubeconfig for `user` that verifies the server with the CA file.
fn kubeconfig(url: &str, ca: &Path, user: &TokenUser) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: nodemesh-test
  cluster:
    server: {url}
    certificate-authority: {ca}
users:
- name: {name}
  user:
    token: {token}
contexts:
- name: {name}@nodemesh-test
  context:
    cluster: nodemesh-test
    user: {name}
    namespace: default
current-context: {name}@nodemesh-test
",
        ca = ca.display(),
        name = user.name,
        token = user.token,
    )
}

/// The generated CA, and where the certificates and keys went.
struct Certificates {
    ca_pem: String,
    files: CertificateFiles,
}

struct CertificateFiles {
    serving_cert: PathBuf,
    serving_key: PathBuf,
    service_account_key: PathBuf,
    service_account_public_key: PathBuf,
}

/// Writes a CA, a serving certificate it signs, and the service-account signing key.
fn write_certificates(dir: &Path) -> anyhow::Result<Certificates> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "nodemesh test kube CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca, ca_key);

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new([
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])?;
    serving.subject_alt_names.push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
    serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    serving.is_ca = IsCa::ExplicitNoCa;
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving.signed_by(&serving_key, &issuer)?;

    // ECDSA P-256: kube-apiserver signs service-account tokens with it (ES256). 1.20 reads the
    // private key as PKCS#8 but wants the verifying key as a separate public key.
    let service_account = KeyPair::generate()?;

    let files = [
        ("ca.crt", ca_pem.clone()),
        ("serving.crt", serving_cert.pem()),
        ("serving.key", serving_key.serialize_pem()),
        ("service-account.key", service_account.serialize_pem()),
        ("service-account.pub", service_account.public_key_pem()),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(Certificates {
        ca_pem,
        files: CertificateFiles {
            serving_cert: dir.join("serving.crt"),
            serving_key: dir.join("serving.key"),
            service_account_key: dir.join("service-account.key"),
            service_account_public_key: dir.join("service-account.pub"),
        },
    })
}

fn pem_to_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    Ok(CertificateDer::from_pem_slice(pem.as_bytes()).context("parsing the CA certificate")?.to_vec())
}

/// Returns a TLS client config trusting only `ca_pem`.
fn tls_config(ca_pem: &str) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem_to_der(ca_pem)?.into()).context("adding the CA to the root store")?;
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Sends one HTTP/1.1 GET with a bearer token; returns the status and body.
fn get(
    tls: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    path: &str,
    token: &str,
) -> anyhow::Result<(u16, String)> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).context("connecting")?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(tls.clone(), name)?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .context("sending the request")?;
    let mut response = Vec::new();
    // The server closes after answering; rustls reports a missing close_notify as an error,
    // which does not matter once the response is in.
    if let Err(err) = stream.read_to_end(&mut response)
        && response.is_empty()
    {
        return Err(err).context("reading the response");
    }
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response: {:?}", text.lines().next().unwrap_or("")))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned();
    Ok((status, body))
}

/// Returns the last lines of the API server's and etcd's logs, labelled.
fn logs_tail(dir: &Path) -> String {
    let mut text = String::new();
    for name in ["kube-apiserver", "etcd"] {
        let path = dir.join(format!("{name}.log"));
        let Ok(log) = fs::read_to_string(&path) else { continue };
        let lines: Vec<&str> = log.lines().collect();
        let _ = writeln!(text, "--- last lines of {} ---", path.display());
        for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
            let _ = writeln!(text, "  | {line}");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_token_file() {
        let admin =
            TokenUser { name: "admin".into(), groups: vec!["system:masters".into()], token: "t1".into() };
        let viewer =
            TokenUser { name: "viewer".into(), groups: vec!["a".into(), "b".into()], token: "t2".into() };
        let nobody = TokenUser { name: "nobody".into(), groups: vec![], token: "t3".into() };
        assert_eq!(
            token_file(&[&admin, &viewer, &nobody]).unwrap(),
            "t1,admin,admin,\"system:masters\"\nt2,viewer,viewer,\"a,b\"\nt3,nobody,nobody,\"\"\n"
        );
        let bad = TokenUser { name: "a,b".into(), groups: vec![], token: "t".into() };
        let err = token_file(&[&bad]).unwrap_err().to_string();
        assert!(err.contains("without commas"), "{err}");
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_ne!(TokenUser::new("x", &[]).token, TokenUser::new("x", &[]).token);
    }

    #[test]
    fn kubeconfig_names_server_ca_and_token() {
        let user = TokenUser { name: "viewer".into(), groups: vec![], token: "secret".into() };
        let text = kubeconfig("https://127.0.0.1:6443", Path::new("/tmp/x/ca.crt"), &user);
        assert!(text.contains("    server: https://127.0.0.1:6443\n"));
        assert!(text.contains("    certificate-authority: /tmp/x/ca.crt\n"));
        assert!(text.contains("    token: secret\n"));
        assert!(text.ends_with("current-context: viewer@nodemesh-test\n"));
    }

    #[test]
    fn names_must_be_path_safe() {
        assert!(check_name("watch-pods_1").is_ok());
        for bad in ["", "../x", "a b", "a/b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sweeps_only_processes_of_its_directory() {
        let dir = Path::new("/tmp/nodemesh-kube/t1");
        let ours = b"/usr/bin/etcd\0--data-dir=/tmp/nodemesh-kube/t1/etcd\0--name=nodemesh\0";
        assert!(is_ours(ours, dir));
        assert!(!is_ours(b"/usr/bin/etcd\0--data-dir=/var/lib/etcd\0", dir));
        assert!(!is_ours(b"", dir));
    }

    #[test]
    fn generates_certificates_clients_accept() {
        let dir = std::env::temp_dir().join(format!("nodemesh-kube-certs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let certs = write_certificates(&dir).unwrap();
        assert!(tls_config(&certs.ca_pem).is_ok());
        let key = fs::read_to_string(&certs.files.service_account_key).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let err = locate(None, Path::new("/nonexistent/target")).unwrap_err().to_string();
        assert_eq!(
            err,
            "kube-apiserver v1.20.2 is not built (no NODEMESH_KUBE_APISERVER, no \
             /nonexistent/target/tools/kube-apiserver-v1.20.2/kube-apiserver): build it with \
             `cargo xtask kube-apiserver` (once, 4 to 6 minutes)"
        );
        let err =
            locate(Some("/nonexistent/kube-apiserver".into()), Path::new("/t")).unwrap_err().to_string();
        assert!(
            err.starts_with("NODEMESH_KUBE_APISERVER is /nonexistent/kube-apiserver, which does not exist")
        );
        let found = locate(Some("/bin/sh".into()), Path::new("/nonexistent"));
        assert_eq!(found.unwrap(), PathBuf::from("/bin/sh"));
    }
}
