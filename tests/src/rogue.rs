//! Hand-made rogue HBONE peers for fail-closed tests: certificates that must not be accepted
//! (wrong identity, expired, from an untrusted CA, without a SPIFFE ID), a rogue server that
//! stands where a pod's `:15008` should be, and a rogue client that dials one.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use rustls::{
    ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
};
use time::OffsetDateTime;

use crate::netns;

/// A certificate chain and its key, as a rogue presents them.
pub struct RogueCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// How a rogue certificate is wrong.
#[derive(Clone, Copy, Debug)]
pub enum Flaw {
    /// Signed by the mesh root, valid, but for another identity.
    WrongIdentity,
    /// The right identity, signed by the mesh root, expired an hour ago.
    Expired,
    /// The right identity, signed by a root nobody trusts.
    UntrustedCa,
    /// Signed by the mesh root, valid, with a DNS name but no SPIFFE ID.
    NoSpiffeId,
}

/// Makes a certificate for `identity` (a SPIFFE URI) with `flaw`. `root_dir` holds the mesh
/// root (`root-cert.pem`, `root-key.pem`); a rogue holding it is the worst case short of a
/// stolen workload key.
pub fn certificate(root_dir: &std::path::Path, identity: &str, flaw: Flaw) -> anyhow::Result<RogueCert> {
    let read = |f: &str| {
        std::fs::read_to_string(root_dir.join(f))
            .with_context(|| format!("reading {}", root_dir.join(f).display()))
    };
    let mesh_root =
        Issuer::from_ca_cert_pem(&read("root-cert.pem")?, KeyPair::from_pem(&read("root-key.pem")?)?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(2);
    params.not_after = now + time::Duration::hours(1);
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let spiffe = |uri: &str| -> anyhow::Result<SanType> { Ok(SanType::URI(uri.try_into()?)) };
    let (certificate, root) = match flaw {
        Flaw::WrongIdentity => {
            params.subject_alt_names.push(spiffe("spiffe://cluster.local/ns/demo/sa/rogue")?);
            (params.signed_by(&key, &mesh_root)?, None)
        }
        Flaw::Expired => {
            params.not_after = now - time::Duration::hours(1);
            params.subject_alt_names.push(spiffe(identity)?);
            (params.signed_by(&key, &mesh_root)?, None)
        }
        Flaw::UntrustedCa => {
            let other_key = KeyPair::generate()?;
            let mut other = CertificateParams::default();
            other.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            other.distinguished_name.push(DnType::CommonName, "rogue root");
            let other_cert = other.self_signed(&other_key)?;
            params.subject_alt_names.push(spiffe(identity)?);
            let issuer = Issuer::new(other, other_key);
            (params.signed_by(&key, &issuer)?, Some(other_cert.der().clone()))
        }
        Flaw::NoSpiffeId => {
            params.subject_alt_names.push(SanType::DnsName("rogue.demo".try_into()?));
            (params.signed_by(&key, &mesh_root)?, None)
        }
    };
    let mut chain = vec![certificate.der().clone()];
    chain.extend(root);
    Ok(RogueCert { chain, key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())) })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a rogue server saw.
#[derive(Debug, Default, Clone)]
pub struct RogueLog {
    /// TCP connections accepted.
    pub connections: usize,
    /// Handshakes that completed (the client accepted the rogue's certificate).
    pub handshakes_completed: usize,
    /// Why the others failed, as the rogue saw it.
    pub handshake_errors: Vec<String>,
}

/// A TLS server presenting a rogue certificate on `addr` inside a netns; it never sends data.
pub struct RogueServer {
    log: Arc<Mutex<RogueLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RogueServer {
    /// Listens on `addr` in `netns_name` and answers handshakes with `cert` (ALPN h2, TLS 1.3).
    pub fn start(netns_name: &str, addr: SocketAddr, cert: RogueCert) -> anyhow::Result<Self> {
        // SO_REUSEADDR: the killed node's closed tunnels may linger in TIME_WAIT on this port.
        // Those still closing (FIN_WAIT, their peer not done yet) were accepted without it and
        // block the port until node-a closes its end, a moment later: bind is retried for 5 s.
        let listener = netns::run_in(netns_name, move || -> std::io::Result<TcpListener> {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let socket =
                    socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                match socket.bind(&addr.into()) {
                    Err(err)
                        if err.kind() == std::io::ErrorKind::AddrInUse
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(err) => return Err(err),
                    Ok(()) => {
                        socket.listen(128)?;
                        return Ok(socket.into());
                    }
                }
            }
        })?
        .with_context(|| format!("rogue listening on {addr} in {netns_name}"))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(cert.chain, cert.key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let config = Arc::new(config);
        listener.set_nonblocking(true)?;
        let log = Arc::new(Mutex::new(RogueLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let mut tcp = match listener.accept() {
                        Ok((tcp, _)) => tcp,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    };
                    let _ = tcp.set_nonblocking(false);
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                    log.lock().unwrap_or_else(|e| e.into_inner()).connections += 1;
                    let outcome = ServerConnection::new(config.clone()).map_err(|e| e.to_string()).and_then(
                        |mut conn| {
                            while conn.is_handshaking() {
                                conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
                            }
                            Ok(())
                        },
                    );
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    match outcome {
                        Ok(()) => log.handshakes_completed += 1,
                        Err(err) => log.handshake_errors.push(err),
                    }
                }
            })
        };
        Ok(RogueServer { log, stop, thread: Some(thread) })
    }

    pub fn log(&self) -> RogueLog {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Closes the listener and returns what it saw.
    pub fn stop(mut self) -> RogueLog {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.log()
    }
}

impl Drop for RogueServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Accepts any server certificate: the rogue client tests the server, not the other way round.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Dials `addr` from inside `netns_name` with `cert` (or none), sends an HTTP/2 preface and a
/// CONNECT-shaped request, and returns `Ok(bytes the server answered)` or the error that ended
/// it. A server that refuses the client never answers with data.
pub fn dial(
    netns_name: &str,
    addr: SocketAddr,
    cert: Option<RogueCert>,
) -> anyhow::Result<Result<usize, String>> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
    let mut config = match cert {
        Some(cert) => builder.with_client_auth_cert(cert.chain, cert.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    netns::run_in(netns_name, move || -> Result<usize, String> {
        let tcp =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let conn = ClientConnection::new(config, ServerName::IpAddress(addr.ip().into()))
            .map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, tcp);
        // The preface and an empty SETTINGS frame: what a real HBONE client sends first.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = [0u8; 1024];
        match tls.read(&mut answer) {
            Ok(0) => Err("closed without answering".into()),
            Ok(n) => Ok(n),
            Err(err) => Err(format!("read: {err}")),
        }
    })
}
