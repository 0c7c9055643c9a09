//! Users: the data layer. Users are global (one login, many tenants), so these functions
//! take no tenant scope; tenant-owned rows live elsewhere and do.

use diesel::prelude::*;
use serde::Serialize;

use crate::audit::{self, Actor, Event};
use crate::db::schema::users;
use crate::db::{DbConnection, now_ms};
use crate::ids::UserId;
use crate::pagination::{Page, PageRequest};
use crate::request_meta::RequestMeta;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = users)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub display_name: String,
    pub password_hash: String,
    pub email_verified_at: Option<i64>,
    pub is_super_admin: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub totp_secret: Option<String>,
    pub totp_enabled_at: Option<i64>,
    pub totp_last_step: Option<i64>,
}

/// What the API shows of a user.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct User {
    #[schema(value_type = String)]
    pub id: UserId,
    pub email: String,
    pub display_name: String,
    pub email_verified: bool,
    pub is_super_admin: bool,
    pub two_factor_enabled: bool,
    pub created_at: i64,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> User {
        User {
            id: UserId::from_db(row.id),
            email: row.email,
            display_name: row.display_name,
            email_verified: row.email_verified_at.is_some(),
            is_super_admin: row.is_super_admin,
            two_factor_enabled: row.totp_enabled_at.is_some(),
            created_at: row.created_at,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: String,
    pub display_name: String,
    pub password_hash: String,
    pub email_verified: bool,
    pub is_super_admin: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateUserError {
    #[error("a user with this email already exists")]
    EmailTaken,
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
}

/// Lower-cases and checks an address. Deliberately loose: the verification mail is the real
/// test of an address.
pub fn normalise_email(email: &str) -> Result<String, &'static str> {
    let email = email.trim().to_lowercase();
    let Some((local, domain)) = email.split_once('@') else {
        return Err("must be an email address");
    };
    if local.is_empty() || domain.is_empty() || !domain.contains('.') || domain.contains('@') {
        return Err("must be an email address");
    }
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must be an email address");
    }
    Ok(email)
}

/// Checks a display name: printable, 1 to 100 characters. Markup is allowed and escaped by
/// whoever renders it.
pub fn check_display_name(name: &str) -> Result<String, &'static str> {
    let name = name.trim();
    let chars = name.chars().count();
    if chars == 0 || chars > 100 || name.chars().any(char::is_control) {
        return Err("must be 1 to 100 printable characters");
    }
    Ok(name.to_string())
}

/// Creates the user and its audit entry in one transaction.
pub fn create(
    conn: &mut DbConnection,
    new: NewUser,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<User, CreateUserError> {
    crate::db::transaction(conn, |conn| {
        let id = UserId::generate();
        let now = now_ms();
        let inserted = diesel::insert_into(users::table)
            .values((
                users::id.eq(id.as_str()),
                users::email.eq(&new.email),
                users::display_name.eq(&new.display_name),
                users::password_hash.eq(&new.password_hash),
                users::email_verified_at.eq(new.email_verified.then_some(now)),
                users::is_super_admin.eq(new.is_super_admin),
                users::created_at.eq(now),
                users::updated_at.eq(now),
            ))
            .execute(conn);
        match inserted {
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            )) => return Err(CreateUserError::EmailTaken),
            other => other?,
        };
        // The actor of a self-registration is the new user.
        let actor = match actor {
            Actor::System if !new.is_super_admin => Actor::User(id.clone()),
            other => other.clone(),
        };
        audit::record(
            conn,
            &actor,
            meta,
            Event::on_user(
                "user.create",
                &id,
                serde_json::json!({ "super_admin": new.is_super_admin }),
            ),
        )?;
        let row = users::table
            .find(id.as_str())
            .select(UserRow::as_select())
            .first(conn)?;
        Ok(row.into())
    })
}

pub fn find(conn: &mut DbConnection, id: &UserId) -> QueryResult<Option<UserRow>> {
    users::table
        .find(id.as_str())
        .select(UserRow::as_select())
        .first(conn)
        .optional()
}

pub fn find_by_email(conn: &mut DbConnection, email: &str) -> QueryResult<Option<UserRow>> {
    users::table
        .filter(users::email.eq(email))
        .select(UserRow::as_select())
        .first(conn)
        .optional()
}

/// Every user, for operators.
pub fn list(conn: &mut DbConnection, page: &PageRequest) -> QueryResult<Page<User>> {
    let mut query = users::table
        .select(UserRow::as_select())
        .order(users::id.asc())
        .into_boxed();
    if let Some(after) = &page.after {
        query = query.filter(users::id.gt(after.clone()));
    }
    let rows = query.limit(page.fetch()).load(conn)?;
    Ok(Page::from_rows(rows, page, |r| r.id.as_str()).map(User::from))
}
