//! Carries a revoked access (`PanelEvent::AccessRevoked`: a member removed, a password
//! reset, a stolen refresh token) to the nodes: every server the user could reach is told to
//! deauthorize them, which closes their console sockets and SFTP sessions and drops wings'
//! cached SFTP grants (SECURITY-CHECKLIST item 12).
//!
//! Every replica hears every event, so with several replicas a node may be told more than
//! once; deauthorize is idempotent. A node that cannot be reached is logged: its tokens expire
//! within minutes and its SFTP cache within `sftp.panel_cache_secs`.

use std::sync::Arc;

use diesel::prelude::*;

use crate::db::schema::{memberships, servers};
use crate::db::{Db, DbConnection, DbError};
use crate::events::{EventBus, PanelEvent};
use crate::ids::{NodeId, ServerId, TenantId, UserId};
use crate::node_pki::PanelPki;
use crate::wings_client::WingsClient;

/// The servers a revocation reaches, with their nodes: the tenant's servers when only one
/// tenant's access went away (the membership is already gone), otherwise the servers of
/// every tenant the user belongs to.
pub fn reached_servers(
    conn: &mut DbConnection,
    user: &UserId,
    tenant: Option<&TenantId>,
) -> QueryResult<Vec<(ServerId, NodeId)>> {
    let tenants: Vec<String> = match tenant {
        Some(t) => vec![t.as_str().to_string()],
        None => memberships::table
            .filter(memberships::user_id.eq(user.as_str()))
            .select(memberships::tenant_id)
            .load(conn)?,
    };
    let rows: Vec<(String, String)> = servers::table
        .filter(servers::tenant_id.eq_any(tenants))
        .select((servers::id, servers::node_id))
        .order(servers::node_id.asc())
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|(s, n)| (ServerId::from_db(s), NodeId::from_db(n)))
        .collect())
}

/// Tells each reached server's node to deauthorize `user`. Returns how many servers were
/// told (a server its node no longer has counts as told).
pub async fn deauthorize(db: &Db, pki: &PanelPki, user: &UserId, tenant: Option<&TenantId>) -> usize {
    let (u, t) = (user.clone(), tenant.cloned());
    let targets = match db
        .run(move |conn| {
            let reached = reached_servers(conn, &u, t.as_ref())?;
            let mut out = Vec::with_capacity(reached.len());
            for (server, node) in reached {
                if let Some(node) = crate::nodes::get(conn, &node)? {
                    out.push((server, node));
                }
            }
            Ok::<_, DbError>(out)
        })
        .await
    {
        Ok(targets) => targets,
        Err(e) => {
            tracing::warn!(user.id = %user, "cannot list the servers to deauthorize: {e}");
            return 0;
        }
    };
    let mut told = 0;
    for (server, node) in targets {
        let result = match WingsClient::new(pki, &node) {
            Ok(client) => client.deauthorize(&server, user.as_str()).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => told += 1,
            Err(e) if e.is_not_found() => told += 1,
            Err(e) => tracing::warn!(user.id = %user, server.id = %server, node.id = %node.id,
                "cannot deauthorize on the node: {e}"),
        }
    }
    told
}

/// Deauthorizes on the nodes for every `AccessRevoked` this replica hears.
pub fn spawn(events: &EventBus, db: Db, pki: Arc<PanelPki>) {
    let mut rx = events.subscribe();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(PanelEvent::AccessRevoked { user, tenant, .. }) => {
                    let told = deauthorize(&db, &pki, &user, tenant.as_ref()).await;
                    tracing::info!(user.id = %user, servers = told, "access revoked on the nodes");
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "revocations lagged behind; some were not sent to nodes"
                    );
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}
