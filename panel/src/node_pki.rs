//! The panel's side of the node PKI (ADR 0009): its certificate authority and token-signing
//! key, enrollment tokens, the certificates it has issued to nodes, and the cache the node
//! listener consults on every handshake and request.
//!
//! Invariants:
//! - the CA key and the token-signing key are stored only sealed under the master key, and
//!   resealed when it rotates ([`reseal_panel_keys`]);
//! - an enrollment token is stored only as its digest, works once, for 15 minutes, for the
//!   one node it was made for;
//! - a node is admitted only with a certificate this panel issued and still lists as live:
//!   not revoked, and not superseded by a renewal for longer than a short grace.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use diesel::prelude::*;
use mamba_shared::node_api::{CertificateResponse, EnrollmentToken};
use mamba_shared::pki::{self, CertInfo, CertSlot, CertificateAuthority, Identity, PeerCheck};
use ring::signature::KeyPair as _;
use serde_json::json;

use crate::audit::{Actor, Event, record};
use crate::db::schema::{node_certificates, node_enrollment_tokens, panel_keys};
use crate::db::{Db, DbConnection, DbError, now_ms};
use crate::keys::MasterKey;
use crate::request_meta::RequestMeta;
use crate::secrets::{FieldSealer, SecretError};
use crate::tokens::{digest, random_token};

/// How long an enrollment token works.
pub const ENROLLMENT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a certificate stays usable after a renewal replaced it, so requests already in
/// flight on the old one finish.
pub const SUPERSEDED_GRACE: Duration = Duration::from_secs(10 * 60);
/// The CA's lifetime. Rotating the CA means re-enrolling every node.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 86_400);
/// The panel's own certificate: re-issued in memory well before this runs out.
pub const PANEL_CERT_VALIDITY: Duration = Duration::from_secs(7 * 86_400);

const CA_KEY: &str = "node_ca";
const TOKEN_KEY: &str = "token_signing";

#[derive(Debug, thiserror::Error)]
pub enum NodePkiError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("PKI: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("key material: {0}")]
    Key(String),
    /// Unknown, used, expired or revoked: deliberately one answer for all of them.
    #[error("the enrollment token is not valid")]
    BadToken,
    #[error("this certificate may not renew")]
    NotLive,
    #[error("the certificate request is not valid: {0}")]
    BadCsr(String),
}

impl From<diesel::result::Error> for NodePkiError {
    fn from(e: diesel::result::Error) -> Self {
        NodePkiError::Db(DbError::Query(e))
    }
}

impl From<crate::tokens::RandomError> for NodePkiError {
    fn from(_: crate::tokens::RandomError) -> Self {
        NodePkiError::Secret(SecretError::Random)
    }
}

impl From<NodePkiError> for crate::error::ApiError {
    fn from(e: NodePkiError) -> Self {
        use crate::error::ApiError;
        match e {
            NodePkiError::BadToken => ApiError::unauthorized("the enrollment token is not valid"),
            NodePkiError::NotLive => ApiError::unauthorized("this certificate may not renew"),
            NodePkiError::BadCsr(m) => ApiError::invalid("csr_pem", m),
            NodePkiError::Db(e) => e.into(),
            other => {
                tracing::error!(error = %other, "node PKI failure");
                ApiError::internal("node PKI failure")
            }
        }
    }
}

fn sealer(master: &MasterKey) -> FieldSealer {
    FieldSealer::panel_keys(master)
}

fn seal_owner(name: &str) -> String {
    format!("panel-key:{name}")
}

/// `-----BEGIN PUBLIC KEY-----` for a raw Ed25519 public key (SubjectPublicKeyInfo).
fn ed25519_public_pem(raw: &[u8]) -> String {
    use base64::Engine as _;
    // SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING { key } }
    let mut der = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    der.extend_from_slice(raw);
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
}

/// Reads the stored key `name` (public part, sealed private part), or makes and stores it.
/// Two panels starting at once both try to insert; the loser reads the winner's.
fn load_or_create_key(
    conn: &mut DbConnection,
    master: &MasterKey,
    name: &str,
    make: impl Fn() -> Result<(String, String), NodePkiError>,
) -> Result<(String, String), NodePkiError> {
    let sealer = sealer(master);
    let read = |conn: &mut DbConnection| -> Result<Option<(String, String)>, NodePkiError> {
        let row: Option<(String, String)> = panel_keys::table
            .find(name)
            .select((panel_keys::public_pem, panel_keys::sealed_private))
            .first(conn)
            .optional()?;
        row.map(|(public, sealed)| Ok((public, sealer.open(&seal_owner(name), &sealed)?)))
            .transpose()
    };
    if let Some(found) = read(conn)? {
        return Ok(found);
    }
    let (public, private) = make()?;
    let inserted = diesel::insert_into(panel_keys::table)
        .values((
            panel_keys::name.eq(name),
            panel_keys::public_pem.eq(&public),
            panel_keys::sealed_private.eq(sealer.seal(&seal_owner(name), &private)?),
            panel_keys::created_at.eq(now_ms()),
        ))
        .execute(conn);
    match inserted {
        Ok(_) => {
            tracing::info!(key = name, "generated a panel key");
            Ok((public, private))
        }
        Err(diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)) => {
            read(conn)?.ok_or_else(|| NodePkiError::Key(format!("{name} vanished")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Reseals the panel's keys from `old` to `new` (part of master key rotation). Keys already
/// under `new` are skipped, so it can run again. Returns how many were resealed.
pub fn reseal_panel_keys(
    conn: &mut DbConnection,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<usize, SecretError> {
    let (old, new) = (sealer(old), sealer(new));
    let rows: Vec<(String, String)> = panel_keys::table
        .select((panel_keys::name, panel_keys::sealed_private))
        .load(conn)?;
    let mut done = 0;
    for (name, sealed) in rows {
        let owner = seal_owner(&name);
        if new.open(&owner, &sealed).is_ok() {
            continue;
        }
        let plain = old.open(&owner, &sealed)?;
        diesel::update(panel_keys::table.find(&name))
            .set(panel_keys::sealed_private.eq(new.seal(&owner, &plain)?))
            .execute(conn)?;
        done += 1;
    }
    Ok(done)
}

/// A certificate the panel admits: which node, and until when (ms).
#[derive(Debug, Clone)]
struct Live {
    node_id: String,
    until_ms: i64,
}

/// The certificates nodes may use, in memory: consulted on every handshake (which cannot
/// wait for a database) and every request. Changes made by this panel apply at once; those
/// made by other replicas within [`CertCache::REFRESH`].
#[derive(Debug, Default)]
pub struct CertCache {
    live: RwLock<HashMap<String, Live>>,
}

impl CertCache {
    pub const REFRESH: Duration = Duration::from_secs(30);

    /// Reloads every live certificate from the database.
    pub fn reload(&self, conn: &mut DbConnection) -> Result<(), diesel::result::Error> {
        let rows: Vec<(String, String, i64, Option<i64>)> = node_certificates::table
            .filter(node_certificates::revoked_at.is_null())
            .select((
                node_certificates::fingerprint,
                node_certificates::node_id,
                node_certificates::not_after,
                node_certificates::superseded_at,
            ))
            .load(conn)?;
        let grace = grace_ms();
        let live = rows
            .into_iter()
            .map(|(fp, node_id, not_after, superseded)| {
                let until_ms = superseded.map_or(not_after * 1000, |s| (s + grace).min(not_after * 1000));
                (fp, Live { node_id, until_ms })
            })
            .filter(|(_, l)| l.until_ms > now_ms())
            .collect();
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = live;
        Ok(())
    }

    /// Whether `node` may use the certificate with `fingerprint` now.
    pub fn admits(&self, node: &str, fingerprint: &str) -> bool {
        self.live
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(fingerprint)
            .is_some_and(|l| l.node_id == node && l.until_ms > now_ms())
    }
}

impl PeerCheck for CertCache {
    fn allow(&self, identity: &Identity, fingerprint: &str) -> bool {
        identity
            .node_id()
            .is_some_and(|node| self.admits(node, fingerprint))
    }
}

fn grace_ms() -> i64 {
    i64::try_from(SUPERSEDED_GRACE.as_millis()).unwrap_or(i64::MAX)
}

/// The panel's PKI: CA, token-signing key, its own certificate and the live-certificate cache.
pub struct PanelPki {
    pub ca: CertificateAuthority,
    /// PKCS#8 of the Ed25519 key that signs console and file tokens for wings.
    token_signing_pkcs8: Vec<u8>,
    pub token_public_pem: String,
    /// The certificate the panel presents to nodes (listener and client), CA appended.
    pub slot: Arc<CertSlot>,
    pub cache: Arc<CertCache>,
    /// How long node certificates are issued for.
    pub node_cert_validity: Duration,
}

impl std::fmt::Debug for PanelPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PanelPki")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl PanelPki {
    /// Loads the stored keys (making them on first start), issues the panel's certificate
    /// and fills the cache. Blocking.
    pub fn load_or_create(
        db: &Db,
        master: &MasterKey,
        node_cert_validity: Duration,
    ) -> Result<PanelPki, NodePkiError> {
        let mut conn = db.get_blocking()?;
        let (ca_pem, ca_key) = load_or_create_key(&mut conn, master, CA_KEY, || {
            let ca = CertificateAuthority::generate("Mamba node CA", CA_VALIDITY)?;
            Ok((ca.cert_pem().to_owned(), ca.key_pem().to_owned()))
        })?;
        let (token_public_pem, token_pkcs8_b64) = load_or_create_key(&mut conn, master, TOKEN_KEY, || {
            use base64::Engine as _;
            let rng = ring::rand::SystemRandom::new();
            let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| NodePkiError::Key("Ed25519 generation failed".into()))?;
            let pair = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref())
                .map_err(|_| NodePkiError::Key("Ed25519 key unreadable".into()))?;
            Ok((
                ed25519_public_pem(pair.public_key().as_ref()),
                base64::engine::general_purpose::STANDARD.encode(doc.as_ref()),
            ))
        })?;
        let token_signing_pkcs8 = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(token_pkcs8_b64)
                .map_err(|_| NodePkiError::Key("token key unreadable".into()))?
        };
        let ca = CertificateAuthority::from_pem(&ca_pem, &ca_key)?;
        let slot = CertSlot::empty();
        let cache = Arc::new(CertCache::default());
        cache.reload(&mut conn)?;
        let pki = PanelPki {
            ca,
            token_signing_pkcs8,
            token_public_pem,
            slot,
            cache,
            node_cert_validity,
        };
        pki.refresh_panel_cert()?;
        Ok(pki)
    }

    /// Issues the panel a fresh certificate (new key) and presents it from now on.
    pub fn refresh_panel_cert(&self) -> Result<(), NodePkiError> {
        let issued = self.ca.issue(&Identity::Panel, PANEL_CERT_VALIDITY)?;
        let chain = format!("{}{}", issued.cert.pem, self.ca.cert_pem());
        self.slot.replace(&chain, &issued.key_pem)?;
        Ok(())
    }

    pub fn token_signing_pkcs8(&self) -> &[u8] {
        &self.token_signing_pkcs8
    }

    /// The TLS configuration of the node listener: node certificates from our CA that the
    /// cache admits; no certificate at all only for enrollment (its handler checks).
    pub fn node_listener_tls(&self) -> Result<rustls::ServerConfig, NodePkiError> {
        Ok(pki::server_config(
            self.ca.cert_pem(),
            self.slot.clone(),
            pki::ClientPolicy {
                role: pki::Role::Node,
                required: false,
                check: Some(self.cache.clone()),
            },
        )?)
    }

    /// A TLS client configuration for calling node `node_id`'s API as the panel: the node
    /// must present a certificate the cache admits (issued through enrollment or renewal,
    /// not revoked), as on the node listener.
    pub fn client_for_node(&self, node_id: &str) -> Result<rustls::ClientConfig, NodePkiError> {
        Ok(pki::client_config_checked(
            self.ca.cert_pem(),
            self.slot.clone(),
            Identity::node(node_id)?,
            Some(self.cache.clone()),
        )?)
    }

    fn answer(&self, node_id: &str, cert: &pki::IssuedCert) -> CertificateResponse {
        CertificateResponse {
            node_id: node_id.to_owned(),
            certificate_pem: cert.pem.clone(),
            ca_pem: self.ca.cert_pem().to_owned(),
            token_public_key_pem: self.token_public_pem.clone(),
            not_after: cert.info.not_after,
        }
    }

    fn sign(&self, csr_pem: &str, node_id: &str) -> Result<pki::IssuedCert, NodePkiError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(NodePkiError::BadCsr("too long".into()));
        }
        let identity = Identity::node(node_id)?;
        self.ca
            .sign_csr(csr_pem, &identity, self.node_cert_validity)
            .map_err(|e| NodePkiError::BadCsr(e.to_string()))
    }
}

fn insert_cert(conn: &mut DbConnection, node_id: &str, cert: &pki::IssuedCert) -> QueryResult<usize> {
    diesel::insert_into(node_certificates::table)
        .values((
            node_certificates::fingerprint.eq(&cert.info.fingerprint),
            node_certificates::node_id.eq(node_id),
            node_certificates::not_after.eq(cert.info.not_after),
            node_certificates::created_at.eq(now_ms()),
        ))
        .execute(conn)
}

/// Marks every other live certificate of the node as superseded now.
fn supersede_others(conn: &mut DbConnection, node_id: &str, keep: &str) -> QueryResult<usize> {
    diesel::update(
        node_certificates::table
            .filter(node_certificates::node_id.eq(node_id))
            .filter(node_certificates::fingerprint.ne(keep))
            .filter(node_certificates::superseded_at.is_null()),
    )
    .set(node_certificates::superseded_at.eq(now_ms()))
    .execute(conn)
}

/// A new enrollment token for `node_id` (which the caller has checked exists), replacing any
/// unused one. The result is shown once: `<secret>.<CA fingerprint>`.
pub fn create_enrollment_token(
    conn: &mut DbConnection,
    pki: &PanelPki,
    node_id: &str,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<(EnrollmentToken, i64), NodePkiError> {
    let secret = random_token(32)?;
    let expires_at = now_ms() + i64::try_from(ENROLLMENT_TOKEN_TTL.as_millis()).unwrap_or(i64::MAX);
    crate::db::transaction(conn, |conn| {
        diesel::delete(
            node_enrollment_tokens::table
                .filter(node_enrollment_tokens::node_id.eq(node_id))
                .filter(node_enrollment_tokens::used_at.is_null()),
        )
        .execute(conn)?;
        diesel::insert_into(node_enrollment_tokens::table)
            .values((
                node_enrollment_tokens::token_hash.eq(digest(&secret)),
                node_enrollment_tokens::node_id.eq(node_id),
                node_enrollment_tokens::expires_at.eq(expires_at),
                node_enrollment_tokens::created_at.eq(now_ms()),
            ))
            .execute(conn)?;
        record(
            conn,
            actor,
            meta,
            Event {
                tenant: None,
                action: "node.enrollment_token.create",
                resource_type: "node",
                resource_id: Some(node_id.to_owned()),
                metadata: json!({ "expires_at": expires_at }),
            },
        )?;
        Ok::<_, diesel::result::Error>(())
    })?;
    Ok((
        EnrollmentToken {
            secret,
            ca_fingerprint: pki.ca.fingerprint(),
        },
        expires_at,
    ))
}

/// Trades a token secret and a CSR for the node's certificate. The token is spent even if a
/// later step fails, so a token is never good twice.
pub fn enroll(
    conn: &mut DbConnection,
    pki: &PanelPki,
    secret: &str,
    csr_pem: &str,
    meta: &RequestMeta,
) -> Result<CertificateResponse, NodePkiError> {
    let hash = digest(secret);
    let now = now_ms();
    let node_id: Option<String> = crate::db::transaction(conn, |conn| {
        let row: Option<(String, i64)> = node_enrollment_tokens::table
            .find(&hash)
            .filter(node_enrollment_tokens::used_at.is_null())
            .select((
                node_enrollment_tokens::node_id,
                node_enrollment_tokens::expires_at,
            ))
            .first(conn)
            .optional()?;
        let Some((node_id, expires_at)) = row else {
            return Ok(None);
        };
        // Conditional on still being unused: of two racing enrollments, one wins.
        let spent = diesel::update(
            node_enrollment_tokens::table
                .find(&hash)
                .filter(node_enrollment_tokens::used_at.is_null()),
        )
        .set(node_enrollment_tokens::used_at.eq(now))
        .execute(conn)?;
        Ok::<_, diesel::result::Error>((spent == 1 && expires_at > now).then_some(node_id))
    })?;
    let Some(node_id) = node_id else {
        return Err(NodePkiError::BadToken);
    };
    let cert = pki.sign(csr_pem, &node_id)?;
    crate::db::transaction(conn, |conn| {
        insert_cert(conn, &node_id, &cert)?;
        supersede_others(conn, &node_id, &cert.info.fingerprint)?;
        record(
            conn,
            &Actor::System,
            meta,
            Event {
                tenant: None,
                action: "node.enroll",
                resource_type: "node",
                resource_id: Some(node_id.clone()),
                metadata: json!({ "fingerprint": cert.info.fingerprint, "not_after": cert.info.not_after }),
            },
        )?;
        Ok::<_, diesel::result::Error>(())
    })?;
    pki.cache.reload(conn)?;
    Ok(pki.answer(&node_id, &cert))
}

/// Issues a node a new certificate over a new key, authenticated by its current one, which
/// is superseded (usable for a short grace).
pub fn renew(
    conn: &mut DbConnection,
    pki: &PanelPki,
    presented: &CertInfo,
    csr_pem: &str,
    meta: &RequestMeta,
) -> Result<CertificateResponse, NodePkiError> {
    let node_id = presented
        .identity
        .node_id()
        .ok_or(NodePkiError::NotLive)?
        .to_owned();
    let live: Option<(String, Option<i64>)> = node_certificates::table
        .find(&presented.fingerprint)
        .filter(node_certificates::revoked_at.is_null())
        .select((node_certificates::node_id, node_certificates::superseded_at))
        .first(conn)
        .optional()?;
    // A superseded certificate cannot renew again: one renewal per certificate.
    if !matches!(live, Some((ref owner, None)) if *owner == node_id) {
        return Err(NodePkiError::NotLive);
    }
    let cert = pki.sign(csr_pem, &node_id)?;
    crate::db::transaction(conn, |conn| {
        insert_cert(conn, &node_id, &cert)?;
        supersede_others(conn, &node_id, &cert.info.fingerprint)?;
        record(
            conn,
            &Actor::System,
            meta,
            Event {
                tenant: None,
                action: "node.certificate.renew",
                resource_type: "node",
                resource_id: Some(node_id.clone()),
                metadata: json!({
                    "fingerprint": cert.info.fingerprint,
                    "previous": presented.fingerprint,
                    "not_after": cert.info.not_after,
                }),
            },
        )?;
        Ok::<_, diesel::result::Error>(())
    })?;
    pki.cache.reload(conn)?;
    Ok(pki.answer(&node_id, &cert))
}

/// Revokes every certificate of the node and any unused enrollment token. Its next
/// handshake or request fails; a new enrollment token re-admits it.
pub fn revoke(
    conn: &mut DbConnection,
    pki: &PanelPki,
    node_id: &str,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<usize, NodePkiError> {
    let revoked = crate::db::transaction(conn, |conn| {
        let revoked = diesel::update(
            node_certificates::table
                .filter(node_certificates::node_id.eq(node_id))
                .filter(node_certificates::revoked_at.is_null()),
        )
        .set(node_certificates::revoked_at.eq(now_ms()))
        .execute(conn)?;
        diesel::delete(
            node_enrollment_tokens::table
                .filter(node_enrollment_tokens::node_id.eq(node_id))
                .filter(node_enrollment_tokens::used_at.is_null()),
        )
        .execute(conn)?;
        record(
            conn,
            actor,
            meta,
            Event {
                tenant: None,
                action: "node.revoke",
                resource_type: "node",
                resource_id: Some(node_id.to_owned()),
                metadata: json!({ "certificates": revoked }),
            },
        )?;
        Ok::<_, diesel::result::Error>(revoked)
    })?;
    pki.cache.reload(conn)?;
    Ok(revoked)
}

/// Keeps the cache in step with other replicas and the panel's own certificate fresh.
pub fn spawn_maintenance(pki: Arc<PanelPki>, db: Db) {
    actix_web::rt::spawn(async move {
        let mut ticks: u64 = 0;
        loop {
            tokio::time::sleep(CertCache::REFRESH).await;
            ticks += 1;
            let (p, d) = (pki.clone(), db.clone());
            let reloaded = d
                .run(move |conn| p.cache.reload(conn).map_err(DbError::Query))
                .await;
            if let Err(e) = reloaded {
                tracing::warn!(error = %e, "reloading node certificates failed");
            }
            // Once a day, well inside the panel certificate's week.
            if ticks.is_multiple_of(2880)
                && let Err(e) = pki.refresh_panel_cert()
            {
                tracing::error!(error = %e, "renewing the panel's own certificate failed");
            }
        }
    });
}
