//! Stored secrets (webhook URLs, payment-gateway keys, node credentials) under envelope
//! encryption: each tenant has a random data key, kept wrapped by the master key; each
//! secret is sealed with its tenant's data key. AES-256-GCM (ring) throughout, with a fresh
//! random nonce per seal, and the owner (tenant, secret name) bound in as associated data
//! so a ciphertext copied to another row does not open.
//!
//! Rotating the master key rewraps the data keys only; secrets stay as they are.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use diesel::prelude::*;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde_json::json;

use crate::audit::{Event, record};
use crate::authz::TenantScope;
use crate::db::schema::{secrets, tenant_keys};
use crate::db::{DbConnection, now_ms};
use crate::ids::TenantId;
use crate::keys::MasterKey;
use crate::request_meta::RequestMeta;
use crate::tokens::random_bytes;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
    #[error("a secret or data key cannot be opened: wrong master key, or tampered data")]
    Undecryptable,
    #[error("the system random number generator failed")]
    Random,
}

fn aead(key: &[u8; 32]) -> Result<LessSafeKey, SecretError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| SecretError::Undecryptable)
}

/// `base64(nonce || ciphertext || tag)`.
fn seal(key: &[u8; 32], aad: &str, plaintext: &[u8]) -> Result<String, SecretError> {
    let nonce: [u8; NONCE_LEN] = random_bytes().map_err(|_| SecretError::Random)?;
    let mut buf = plaintext.to_vec();
    aead(key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_bytes()),
            &mut buf,
        )
        .map_err(|_| SecretError::Undecryptable)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    Ok(STANDARD.encode(out))
}

fn open(key: &[u8; 32], aad: &str, sealed: &str) -> Result<Vec<u8>, SecretError> {
    let bytes = STANDARD.decode(sealed).map_err(|_| SecretError::Undecryptable)?;
    if bytes.len() < NONCE_LEN {
        return Err(SecretError::Undecryptable);
    }
    let (nonce, rest) = bytes.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Undecryptable)?;
    let mut buf = rest.to_vec();
    let plain = aead(key)?
        .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
        .map_err(|_| SecretError::Undecryptable)?;
    Ok(plain.to_vec())
}

/// Seals and opens secrets with the master key it was given.
#[derive(Clone)]
pub struct SecretBox {
    wrapping: [u8; 32],
    master_id: String,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBox(master {})", self.master_id)
    }
}

impl SecretBox {
    pub fn new(master: &MasterKey) -> SecretBox {
        SecretBox {
            wrapping: master.derive("tenant-data-keys"),
            master_id: master.id(),
        }
    }

    fn wrap_aad(tenant: &str) -> String {
        format!("tenant-key:{tenant}")
    }

    /// The tenant's data key, made on first use.
    fn data_key(&self, conn: &mut DbConnection, tenant: &TenantId) -> Result<[u8; 32], SecretError> {
        let wrapped: Option<String> = tenant_keys::table
            .find(tenant.as_str())
            .select(tenant_keys::wrapped_key)
            .first(conn)
            .optional()?;
        if let Some(wrapped) = wrapped {
            let key = open(&self.wrapping, &Self::wrap_aad(tenant.as_str()), &wrapped)?;
            return key.try_into().map_err(|_| SecretError::Undecryptable);
        }
        let key: [u8; 32] = random_bytes().map_err(|_| SecretError::Random)?;
        diesel::insert_into(tenant_keys::table)
            .values((
                tenant_keys::tenant_id.eq(tenant.as_str()),
                tenant_keys::wrapped_key.eq(seal(&self.wrapping, &Self::wrap_aad(tenant.as_str()), &key)?),
                tenant_keys::master_key_id.eq(&self.master_id),
                tenant_keys::created_at.eq(now_ms()),
            ))
            .execute(conn)?;
        Ok(key)
    }

    fn secret_aad(tenant: &TenantId, name: &str) -> String {
        format!("secret:{tenant}:{name}")
    }

    /// Stores (or replaces) the secret `name` of the tenant, with its audit entry. The
    /// value never reaches the log.
    pub fn put(
        &self,
        conn: &mut DbConnection,
        scope: &TenantScope,
        name: &str,
        value: &str,
        meta: &RequestMeta,
    ) -> Result<(), SecretError> {
        crate::db::transaction(conn, |conn| {
            let key = self.data_key(conn, scope.tenant())?;
            let sealed = seal(&key, &Self::secret_aad(scope.tenant(), name), value.as_bytes())?;
            let now = now_ms();
            let updated = diesel::update(
                secrets::table
                    .filter(secrets::tenant_id.eq(scope.tenant().as_str()))
                    .filter(secrets::name.eq(name)),
            )
            .set((secrets::ciphertext.eq(&sealed), secrets::updated_at.eq(now)))
            .execute(conn)?;
            if updated == 0 {
                diesel::insert_into(secrets::table)
                    .values((
                        secrets::id.eq(uuid::Uuid::now_v7().to_string()),
                        secrets::tenant_id.eq(scope.tenant().as_str()),
                        secrets::name.eq(name),
                        secrets::ciphertext.eq(&sealed),
                        secrets::created_at.eq(now),
                        secrets::updated_at.eq(now),
                    ))
                    .execute(conn)?;
            }
            record(
                conn,
                scope.actor(),
                meta,
                Event {
                    tenant: Some(scope.tenant()),
                    action: "secret.put",
                    resource_type: "secret",
                    resource_id: Some(name.to_string()),
                    metadata: json!({}),
                },
            )?;
            Ok(())
        })
    }

    /// Seals a value kept in a tenant's own row (a backup's key: `owner` = `backup:<id>`)
    /// under the tenant's data key, so master key rotation covers it like any secret.
    pub fn seal_for(
        &self,
        conn: &mut DbConnection,
        tenant: &TenantId,
        owner: &str,
        value: &str,
    ) -> Result<String, SecretError> {
        let key = self.data_key(conn, tenant)?;
        seal(&key, &format!("field:{tenant}:{owner}"), value.as_bytes())
    }

    /// Opens what [`SecretBox::seal_for`] sealed for the same tenant and owner.
    pub fn open_for(
        &self,
        conn: &mut DbConnection,
        tenant: &TenantId,
        owner: &str,
        sealed: &str,
    ) -> Result<String, SecretError> {
        let key = self.data_key(conn, tenant)?;
        let plain = open(&key, &format!("field:{tenant}:{owner}"), sealed)?;
        String::from_utf8(plain).map_err(|_| SecretError::Undecryptable)
    }

    /// Reads the secret `name` of the tenant.
    pub fn get(
        &self,
        conn: &mut DbConnection,
        scope: &TenantScope,
        name: &str,
    ) -> Result<Option<String>, SecretError> {
        let sealed: Option<String> = secrets::table
            .filter(secrets::tenant_id.eq(scope.tenant().as_str()))
            .filter(secrets::name.eq(name))
            .select(secrets::ciphertext)
            .first(conn)
            .optional()?;
        let Some(sealed) = sealed else { return Ok(None) };
        let key = self.data_key(conn, scope.tenant())?;
        let plain = open(&key, &Self::secret_aad(scope.tenant(), name), &sealed)?;
        String::from_utf8(plain)
            .map(Some)
            .map_err(|_| SecretError::Undecryptable)
    }
}

/// Seals single values that belong to no tenant (users' TOTP seeds) directly under a key
/// derived from the master key, bound to their owner.
#[derive(Clone)]
pub struct FieldSealer {
    key: [u8; 32],
}

impl std::fmt::Debug for FieldSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FieldSealer")
    }
}

impl FieldSealer {
    pub fn totp(master: &MasterKey) -> FieldSealer {
        FieldSealer {
            key: master.derive("totp-secrets"),
        }
    }

    /// The panel's own private keys (node CA, token signing); see `node_pki`.
    pub fn panel_keys(master: &MasterKey) -> FieldSealer {
        FieldSealer {
            key: master.derive("panel-keys"),
        }
    }

    pub fn seal(&self, owner: &str, value: &str) -> Result<String, SecretError> {
        seal(&self.key, owner, value.as_bytes())
    }

    pub fn open(&self, owner: &str, sealed: &str) -> Result<String, SecretError> {
        String::from_utf8(open(&self.key, owner, sealed)?).map_err(|_| SecretError::Undecryptable)
    }
}

/// Reseals users' TOTP seeds from `old` to `new`; seeds already under `new` are skipped, so
/// this too can run again after an interruption. Returns how many were resealed.
fn reseal_totp_seeds(
    conn: &mut DbConnection,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<usize, SecretError> {
    use crate::db::schema::users;
    let (old, new) = (FieldSealer::totp(old), FieldSealer::totp(new));
    let sealed: Vec<(String, String)> = users::table
        .filter(users::totp_secret.is_not_null())
        .select((users::id, users::totp_secret.assume_not_null()))
        .load(conn)?;
    let mut done = 0;
    for (user, value) in sealed {
        if new.open(&user, &value).is_ok() {
            continue;
        }
        let plain = old.open(&user, &value)?;
        diesel::update(users::table.find(&user))
            .set(users::totp_secret.eq(new.seal(&user, &plain)?))
            .execute(conn)?;
        done += 1;
    }
    Ok(done)
}

/// Rewraps every tenant data key from `old` to `new`, one transaction per key, so it can
/// be stopped and run again: keys already under `new` are skipped. Returns how many keys
/// were rewrapped.
pub fn rotate_master_key(
    conn: &mut DbConnection,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<usize, SecretError> {
    let (old_box, new_box) = (SecretBox::new(old), SecretBox::new(new));
    let pending: Vec<(String, String)> = tenant_keys::table
        .filter(tenant_keys::master_key_id.ne(&new_box.master_id))
        .select((tenant_keys::tenant_id, tenant_keys::wrapped_key))
        .load(conn)?;
    let mut done = 0;
    for (tenant, wrapped) in pending {
        let aad = SecretBox::wrap_aad(&tenant);
        let key = open(&old_box.wrapping, &aad, &wrapped)?;
        let rewrapped = seal(&new_box.wrapping, &aad, &key)?;
        crate::db::transaction(conn, |conn| {
            diesel::update(tenant_keys::table.find(&tenant))
                .set((
                    tenant_keys::wrapped_key.eq(&rewrapped),
                    tenant_keys::master_key_id.eq(&new_box.master_id),
                ))
                .execute(conn)?;
            record(
                conn,
                &crate::audit::Actor::System,
                &RequestMeta::system(),
                Event {
                    tenant: Some(&TenantId::from_db(tenant.clone())),
                    action: "tenant_key.rewrap",
                    resource_type: "tenant",
                    resource_id: Some(tenant.clone()),
                    metadata: json!({ "master_key_id": new_box.master_id }),
                },
            )?;
            Ok::<_, diesel::result::Error>(())
        })?;
        done += 1;
    }
    let seeds = reseal_totp_seeds(conn, old, new)?;
    if seeds > 0 {
        tracing::info!(count = seeds, "resealed TOTP seeds");
    }
    let panel_keys = crate::node_pki::reseal_panel_keys(conn, old, new)?;
    if panel_keys > 0 {
        tracing::info!(count = panel_keys, "resealed the panel's keys");
    }
    Ok(done)
}
