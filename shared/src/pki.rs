//! The node PKI: one certificate authority, run by the panel, signs a certificate for the
//! panel and one for every node. Both directions between panel and wings are mutual TLS, and
//! each side accepts only certificates chained to that CA that name the role it expects.
//!
//! An identity is a URI subject alternative name: `urn:mamba:panel` or
//! `urn:mamba:node:<node id>`. DNS names are deliberately not used to authenticate: nodes are
//! reached by whatever address the operator gives them, and what matters is who holds the key.
//!
//! Everything here runs on rustls' ring provider; nothing relies on a process-wide default.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName as TlsDistinguishedName,
    RootCertStore, ServerConfig, SignatureScheme,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

const URN_PANEL: &str = "urn:mamba:panel";
const URN_NODE_PREFIX: &str = "urn:mamba:node:";

/// The name a client puts in its TLS hello. Never checked: peers are authenticated by the
/// identity in their certificate, not by a host name.
pub const TLS_SERVER_NAME: &str = "mamba.invalid";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("certificate could not be parsed")]
    BadCertificate,
    #[error("the certificate names no Mamba identity, or more than one")]
    NoIdentity,
    #[error("not a valid node id")]
    BadNodeId,
    #[error("validity out of range")]
    BadValidity,
}

/// What a certificate-holder may do: the panel drives nodes; a node reports to the panel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Panel,
    Node,
}

/// Who a certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Panel,
    Node(String),
}

/// Node ids are the panel's UUIDs; anything of the same shape is accepted so tests and other
/// deployments can use readable ids, but nothing that could smuggle a second URI component.
fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Identity {
    pub fn node(id: &str) -> Result<Identity, PkiError> {
        if valid_node_id(id) {
            Ok(Identity::Node(id.to_owned()))
        } else {
            Err(PkiError::BadNodeId)
        }
    }

    pub fn role(&self) -> Role {
        match self {
            Identity::Panel => Role::Panel,
            Identity::Node(_) => Role::Node,
        }
    }

    pub fn uri(&self) -> String {
        match self {
            Identity::Panel => URN_PANEL.to_owned(),
            Identity::Node(id) => format!("{URN_NODE_PREFIX}{id}"),
        }
    }

    pub fn from_uri(uri: &str) -> Option<Identity> {
        if uri == URN_PANEL {
            return Some(Identity::Panel);
        }
        let id = uri.strip_prefix(URN_NODE_PREFIX)?;
        valid_node_id(id).then(|| Identity::Node(id.to_owned()))
    }

    /// The node id, for a node identity.
    pub fn node_id(&self) -> Option<&str> {
        match self {
            Identity::Panel => None,
            Identity::Node(id) => Some(id),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// Lower-case hex SHA-256 of a certificate's DER: how certificates are named in the database,
/// in enrollment tokens and in logs.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The facts about a certificate that the panel and wings act on.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub identity: Identity,
    pub fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// Reads the one Mamba identity and the validity of a certificate. Does not verify anything.
pub fn inspect(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| PkiError::BadCertificate)?;
    let mut found = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && uri.starts_with("urn:mamba:")
            {
                let identity = Identity::from_uri(uri).ok_or(PkiError::NoIdentity)?;
                if found.replace(identity).is_some() {
                    return Err(PkiError::NoIdentity);
                }
            }
        }
    }
    Ok(CertInfo {
        identity: found.ok_or(PkiError::NoIdentity)?,
        fingerprint: fingerprint(der),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// A certificate as PEM, DER and its facts.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub der: CertificateDer<'static>,
    pub info: CertInfo,
}

/// A freshly made leaf: certificate plus private key (PEM, PKCS#8).
#[derive(Debug, Clone)]
pub struct IssuedKeyPair {
    pub cert: IssuedCert,
    pub key_pem: String,
}

/// The panel's certificate authority. Its key never leaves the panel (stored sealed there).
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl CertificateAuthority {
    /// A new CA valid for `validity`, named `common_name` (the subject is informational).
    pub fn generate(common_name: &str, validity: Duration) -> Result<CertificateAuthority, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Mamba");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // Backdated a little so a node whose clock lags by minutes still accepts it.
        params.not_before = now() - time::Duration::minutes(10);
        params.not_after = now() + to_time(validity)?;
        let cert = params.self_signed(&key)?;
        CertificateAuthority::from_pem(&cert.pem(), &key.serialize_pem())
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertificateAuthority, PkiError> {
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::Pem(e.to_string()))?;
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The private key, PEM. Callers store it sealed, never in the clear.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    pub fn roots(&self) -> Result<RootCertStore, PkiError> {
        roots_of(&self.cert_der)
    }

    /// Signs a certificate for `identity` over the public key in `csr_pem`. Everything else
    /// the CSR asks for (subject, names, usages, validity) is ignored: the CA decides.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let from = now() - time::Duration::minutes(5);
        self.sign(&csr.public_key, identity, from, now() + to_time(validity)?)
    }

    /// A new key pair and certificate for `identity`, valid from `not_before` to `not_after`.
    /// The panel uses it for its own certificate; tests use it for expired or odd ones.
    pub fn issue_between(
        &self,
        identity: &Identity,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedKeyPair, PkiError> {
        let key = KeyPair::generate()?;
        let cert = self.sign(&key, identity, not_before, not_after)?;
        Ok(IssuedKeyPair {
            cert,
            key_pem: key.serialize_pem(),
        })
    }

    pub fn issue(&self, identity: &Identity, validity: Duration) -> Result<IssuedKeyPair, PkiError> {
        self.issue_between(
            identity,
            now() - time::Duration::minutes(5),
            now() + to_time(validity)?,
        )
    }

    fn sign(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &Identity,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.uri());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            identity.uri().try_into().map_err(|_| PkiError::NoIdentity)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every leaf is both a TLS server and a TLS client: nodes serve the panel and call it,
        // and the panel does the same the other way round.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let mut serial = [0u8; 16];
        rand_fill(&mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params.signed_by(public_key, &self.issuer)?;
        let der = cert.der().clone();
        Ok(IssuedCert {
            pem: cert.pem(),
            info: inspect(&der)?,
            der,
        })
    }
}

fn rand_fill(buf: &mut [u8]) {
    // rcgen's own key generation already relies on ring's system RNG; a failure there would
    // have stopped us before this point, so a zero serial is merely unlikely-unique, not unsafe.
    let rng = ring::rand::SystemRandom::new();
    let _ = ring::rand::SecureRandom::fill(&rng, buf);
}

fn to_time(d: Duration) -> Result<time::Duration, PkiError> {
    time::Duration::try_from(d).map_err(|_| PkiError::BadValidity)
}

fn roots_of(ca_der: &CertificateDer<'_>) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone().into_owned())?;
    Ok(roots)
}

/// A fresh node key and a CSR for it (PEMs). The CSR carries only the public key that matters.
pub fn generate_key_and_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "mamba node");
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Parses every certificate in a PEM bundle.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(PkiError::Pem("no certificate".into()));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The certificate (chain) and key this side presents. Swapped in place when a renewed
/// certificate arrives, so listeners and clients pick it up without a restart.
#[derive(Default)]
pub struct CertSlot {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    fingerprint: RwLock<Option<CertInfo>>,
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSlot").field("info", &self.info()).finish()
    }
}

impl CertSlot {
    /// An empty slot presents no certificate (enrollment, anonymous tests).
    pub fn empty() -> Arc<CertSlot> {
        Arc::new(CertSlot::default())
    }

    /// A slot holding `chain_pem` (leaf first, optionally followed by the CA) and its key.
    pub fn new(chain_pem: &str, key_pem: &str) -> Result<Arc<CertSlot>, PkiError> {
        let slot = CertSlot::empty();
        slot.replace(chain_pem, key_pem)?;
        Ok(slot)
    }

    pub fn replace(&self, chain_pem: &str, key_pem: &str) -> Result<(), PkiError> {
        let chain = certs_from_pem(chain_pem)?;
        let info = inspect(&chain[0])?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| PkiError::Pem(e.to_string()))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
        let certified = Arc::new(CertifiedKey::new(chain, signer));
        certified.keys_match()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(certified);
        *self.fingerprint.write().unwrap_or_else(|e| e.into_inner()) = Some(info);
        Ok(())
    }

    /// The facts of the certificate presented now, if any.
    pub fn info(&self) -> Option<CertInfo> {
        self.fingerprint.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for CertSlot {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

/// A last word on a peer that passed chain and role checks: the panel uses it to refuse
/// revoked or superseded certificates during the handshake.
pub trait PeerCheck: Send + Sync {
    fn allow(&self, identity: &Identity, fingerprint: &str) -> bool;
}

/// Whom a server accepts as a client.
#[derive(Clone)]
pub struct ClientPolicy {
    pub role: Role,
    /// Whether a client without a certificate may complete the handshake (the enrollment
    /// route authenticates with a token instead; every other route then refuses it).
    pub required: bool,
    pub check: Option<Arc<dyn PeerCheck>>,
}

impl fmt::Debug for ClientPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientPolicy")
            .field("role", &self.role)
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

/// Chains to our CA (rustls' own verifier), then the role and the optional check.
#[derive(Debug)]
struct RoleClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: ClientPolicy,
}

fn refused() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

impl ClientCertVerifier for RoleClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.policy.required
    }

    fn root_hint_subjects(&self) -> &[TlsDistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let info = inspect(end_entity).map_err(|_| refused())?;
        if info.identity.role() != self.policy.role {
            return Err(refused());
        }
        if let Some(check) = &self.policy.check
            && !check.allow(&info.identity, &info.fingerprint)
        {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS 1.3 server presenting `slot` and accepting clients per `policy`, chained to `ca_pem`.
pub fn server_config(
    ca_pem: &str,
    slot: Arc<CertSlot>,
    policy: ClientPolicy,
) -> Result<ServerConfig, PkiError> {
    let ca = certs_from_pem(ca_pem)?;
    let roots = Arc::new(roots_of(&ca[0])?);
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(RoleClientVerifier { inner, policy });
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(slot))
}

/// Which server certificates a client accepts.
#[derive(Debug, Clone)]
enum Trust {
    /// Chained to this CA.
    Ca(Arc<RootCertStore>),
    /// Chained to whichever certificate in the server's own chain has this SHA-256
    /// fingerprint: enrollment, when all the node knows is the fingerprint in its token.
    Pinned(String),
}

struct IdentityServerVerifier {
    trust: Trust,
    expected: Identity,
    algorithms: WebPkiSupportedAlgorithms,
    check: Option<Arc<dyn PeerCheck>>,
}

impl fmt::Debug for IdentityServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for IdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = match &self.trust {
            Trust::Ca(roots) => roots.clone(),
            Trust::Pinned(pin) => {
                let ca = intermediates
                    .iter()
                    .find(|c| fingerprint(c).eq_ignore_ascii_case(pin))
                    .ok_or(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
                Arc::new(roots_of(ca).map_err(|_| refused())?)
            }
        };
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&parsed, &roots, intermediates, now, self.algorithms.all)?;
        let info = inspect(end_entity).map_err(|_| refused())?;
        if info.identity != self.expected {
            return Err(refused());
        }
        if let Some(check) = &self.check
            && !check.allow(&info.identity, &info.fingerprint)
        {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn client_with(
    trust: Trust,
    slot: Arc<CertSlot>,
    expected: Identity,
    check: Option<Arc<dyn PeerCheck>>,
) -> Result<ClientConfig, PkiError> {
    let verifier = Arc::new(IdentityServerVerifier {
        trust,
        expected,
        algorithms: algorithms(),
        check,
    });
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(slot))
}

/// A TLS 1.3 client presenting `slot`, accepting only a server chained to `ca_pem` that holds
/// `expected`'s certificate.
pub fn client_config(
    ca_pem: &str,
    slot: Arc<CertSlot>,
    expected: Identity,
) -> Result<ClientConfig, PkiError> {
    client_config_checked(ca_pem, slot, expected, None)
}

/// [`client_config`], with `check` having the last word on the server's certificate: the
/// panel uses it so that calls to a node whose certificate was revoked or never issued
/// through enrollment fail in the handshake.
pub fn client_config_checked(
    ca_pem: &str,
    slot: Arc<CertSlot>,
    expected: Identity,
    check: Option<Arc<dyn PeerCheck>>,
) -> Result<ClientConfig, PkiError> {
    let ca = certs_from_pem(ca_pem)?;
    client_with(Trust::Ca(Arc::new(roots_of(&ca[0])?)), slot, expected, check)
}

/// The client a node enrolls with: no certificate of its own yet, and the panel's CA known
/// only by the fingerprint in the enrollment token.
pub fn enrollment_client_config(ca_fingerprint: &str) -> Result<ClientConfig, PkiError> {
    client_with(
        Trust::Pinned(ca_fingerprint.to_ascii_lowercase()),
        CertSlot::empty(),
        Identity::Panel,
        None,
    )
}

/// The identity of the peer of an established connection (its verified end-entity
/// certificate), or `None` for an anonymous peer.
pub fn peer_identity(peer_certs: Option<&[CertificateDer<'_>]>) -> Option<CertInfo> {
    inspect(peer_certs?.first()?).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::{Read, Write};

    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    /// Drives a client and a server connection against each other in memory.
    fn handshake(client: ClientConfig, server: ServerConfig) -> Result<Option<CertInfo>, rustls::Error> {
        let mut c =
            rustls::ClientConnection::new(Arc::new(client), ServerName::try_from(TLS_SERVER_NAME).unwrap())?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                // Application data proves the server accepted the client's certificate too.
                c.writer().write_all(b"ping").unwrap();
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets()?;
                let mut got = [0u8; 4];
                s.reader().read_exact(&mut got).unwrap();
                return Ok(peer_identity(s.peer_certificates()));
            }
        }
        panic!("handshake did not finish");
    }

    /// The refusal must come from certificate verification, not from some other failure.
    fn assert_refused(result: Result<Option<CertInfo>, rustls::Error>) {
        match result {
            Err(rustls::Error::InvalidCertificate(_)) => {}
            other => panic!("expected a certificate refusal, got {other:?}"),
        }
    }

    struct Setup {
        ca: CertificateAuthority,
        panel: Arc<CertSlot>,
    }

    fn setup() -> Setup {
        let ca = CertificateAuthority::generate("test CA", DAY * 365).unwrap();
        let panel = ca.issue(&Identity::Panel, DAY).unwrap();
        let chain = format!("{}{}", panel.cert.pem, ca.cert_pem());
        Setup {
            panel: CertSlot::new(&chain, &panel.key_pem).unwrap(),
            ca,
        }
    }

    fn node_policy(required: bool) -> ClientPolicy {
        ClientPolicy {
            role: Role::Node,
            required,
            check: None,
        }
    }

    fn node_slot(ca: &CertificateAuthority, id: &str) -> Arc<CertSlot> {
        let (key, csr) = generate_key_and_csr().unwrap();
        let cert = ca.sign_csr(&csr, &Identity::node(id).unwrap(), DAY).unwrap();
        CertSlot::new(&cert.pem, &key).unwrap()
    }

    #[test]
    fn node_with_a_signed_csr_is_accepted_with_its_identity() {
        let s = setup();
        let server = server_config(s.ca.cert_pem(), s.panel.clone(), node_policy(true)).unwrap();
        let client = client_config(s.ca.cert_pem(), node_slot(&s.ca, "node-1"), Identity::Panel).unwrap();
        let peer = handshake(client, server).unwrap().unwrap();
        assert_eq!(peer.identity, Identity::Node("node-1".into()));
    }

    #[test]
    fn csr_asks_are_ignored_the_ca_decides() {
        let s = setup();
        // A CSR that asks for the panel's identity still yields a node certificate.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(URN_PANEL.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let cert = s.ca.sign_csr(&csr, &Identity::node("n").unwrap(), DAY).unwrap();
        assert_eq!(cert.info.identity, Identity::Node("n".into()));
    }

    #[test]
    fn foreign_ca_is_refused_both_ways() {
        let s = setup();
        let foreign = CertificateAuthority::generate("foreign", DAY).unwrap();
        let server = server_config(s.ca.cert_pem(), s.panel.clone(), node_policy(true)).unwrap();
        let client = client_config(s.ca.cert_pem(), node_slot(&foreign, "n"), Identity::Panel).unwrap();
        assert_refused(handshake(client, server));

        // A server with a foreign CA's panel certificate is refused by the node.
        let fake = foreign.issue(&Identity::Panel, DAY).unwrap();
        let fake_slot = CertSlot::new(&fake.cert.pem, &fake.key_pem).unwrap();
        let server = server_config(s.ca.cert_pem(), fake_slot, node_policy(true)).unwrap();
        let client = client_config(s.ca.cert_pem(), node_slot(&s.ca, "n"), Identity::Panel).unwrap();
        assert_refused(handshake(client, server));
    }

    #[test]
    fn wrong_role_is_refused_both_ways() {
        let s = setup();
        // A node certificate where a panel is expected as the client.
        let server = server_config(
            s.ca.cert_pem(),
            node_slot(&s.ca, "a"),
            ClientPolicy {
                role: Role::Panel,
                required: true,
                check: None,
            },
        )
        .unwrap();
        let client =
            client_config(s.ca.cert_pem(), node_slot(&s.ca, "b"), Identity::Node("a".into())).unwrap();
        assert_refused(handshake(client, server));

        // A node serving where the panel is expected.
        let server = server_config(s.ca.cert_pem(), node_slot(&s.ca, "a"), node_policy(true)).unwrap();
        let client = client_config(s.ca.cert_pem(), node_slot(&s.ca, "b"), Identity::Panel).unwrap();
        assert_refused(handshake(client, server));

        // Node b's certificate when the client expects node a.
        let server = server_config(
            s.ca.cert_pem(),
            node_slot(&s.ca, "b"),
            ClientPolicy {
                role: Role::Panel,
                required: true,
                check: None,
            },
        )
        .unwrap();
        let client = client_config(s.ca.cert_pem(), s.panel.clone(), Identity::Node("a".into())).unwrap();
        assert_refused(handshake(client, server));
    }

    #[test]
    fn expired_certificate_is_refused() {
        let s = setup();
        let old =
            s.ca.issue_between(
                &Identity::node("n").unwrap(),
                now() - time::Duration::days(10),
                now() - time::Duration::days(1),
            )
            .unwrap();
        let server = server_config(s.ca.cert_pem(), s.panel.clone(), node_policy(true)).unwrap();
        let client = client_config(
            s.ca.cert_pem(),
            CertSlot::new(&old.cert.pem, &old.key_pem).unwrap(),
            Identity::Panel,
        )
        .unwrap();
        assert_refused(handshake(client, server));
    }

    #[test]
    fn anonymous_client_is_refused_unless_optional() {
        let s = setup();
        let server = server_config(s.ca.cert_pem(), s.panel.clone(), node_policy(true)).unwrap();
        let client = client_config(s.ca.cert_pem(), CertSlot::empty(), Identity::Panel).unwrap();
        assert!(matches!(
            handshake(client, server),
            Err(rustls::Error::NoCertificatesPresented)
        ));

        let server = server_config(s.ca.cert_pem(), s.panel.clone(), node_policy(false)).unwrap();
        let client = enrollment_client_config(&s.ca.fingerprint()).unwrap();
        assert!(handshake(client, server).unwrap().is_none());
    }

    #[test]
    fn enrollment_pins_the_ca_fingerprint() {
        let s = setup();
        let server = server_config(s.ca.cert_pem(), s.panel.clone(), node_policy(false)).unwrap();
        let other = CertificateAuthority::generate("other", DAY).unwrap();
        let client = enrollment_client_config(&other.fingerprint()).unwrap();
        assert_refused(handshake(client, server));
    }

    #[test]
    fn revoked_by_check_is_refused_and_slot_rotates() {
        struct DenyAll;
        impl PeerCheck for DenyAll {
            fn allow(&self, _: &Identity, _: &str) -> bool {
                false
            }
        }
        let s = setup();
        let policy = ClientPolicy {
            role: Role::Node,
            required: true,
            check: Some(Arc::new(DenyAll)),
        };
        let server = server_config(s.ca.cert_pem(), s.panel.clone(), policy).unwrap();
        let client = client_config(s.ca.cert_pem(), node_slot(&s.ca, "n"), Identity::Panel).unwrap();
        assert_refused(handshake(client, server));

        // Rotation: the same slot, a new certificate, picked up by the next handshake.
        let slot = node_slot(&s.ca, "n");
        let before = slot.info().unwrap().fingerprint;
        let (key, csr) = generate_key_and_csr().unwrap();
        let renewed = s.ca.sign_csr(&csr, &Identity::node("n").unwrap(), DAY).unwrap();
        slot.replace(&renewed.pem, &key).unwrap();
        assert_ne!(slot.info().unwrap().fingerprint, before);
        let server = server_config(s.ca.cert_pem(), s.panel.clone(), node_policy(true)).unwrap();
        let client = client_config(s.ca.cert_pem(), slot, Identity::Panel).unwrap();
        let peer = handshake(client, server).unwrap().unwrap();
        assert_eq!(peer.fingerprint, renewed.info.fingerprint);
    }

    #[test]
    fn identities_round_trip_and_reject_junk() {
        assert_eq!(Identity::from_uri("urn:mamba:panel"), Some(Identity::Panel));
        assert_eq!(
            Identity::from_uri("urn:mamba:node:abc-1"),
            Some(Identity::Node("abc-1".into()))
        );
        for bad in [
            "urn:mamba:node:",
            "urn:mamba:node:a/b",
            "urn:mamba:node:a:b",
            "urn:mamba:x",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }
}
