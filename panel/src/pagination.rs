//! Cursor pagination: `?limit=N&cursor=C` in, `{"items": [...], "next_cursor": C|null}` out.
//!
//! Ids are UUIDv7 (time-ordered), so "rows with an id after the cursor, by id" is a stable
//! order that new rows never shuffle. The cursor is the last id of a page, opaque to clients.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// A checked page request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: i64,
    /// Only rows with an id strictly greater than this.
    pub after: Option<String>,
}

impl PageQuery {
    pub fn check(&self) -> Result<PageRequest, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid(
                "limit",
                format!("must be between 1 and {MAX_LIMIT}"),
            ));
        }
        let after = match &self.cursor {
            None => None,
            Some(c) => Some(decode_cursor(c).ok_or_else(|| ApiError::invalid("cursor", "is not a cursor"))?),
        };
        Ok(PageRequest { limit, after })
    }
}

impl PageRequest {
    /// Rows to fetch: one more than the page, to learn whether another page follows.
    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds the page from up to `limit + 1` rows fetched in id order.
    pub fn from_rows(mut rows: Vec<T>, request: &PageRequest, id: impl Fn(&T) -> &str) -> Page<T> {
        let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > request.limit;
        rows.truncate(usize::try_from(request.limit).unwrap_or(0));
        let next_cursor = if more {
            rows.last().map(|last| URL_SAFE_NO_PAD.encode(id(last)))
        } else {
            None
        };
        Page {
            items: rows,
            next_cursor,
        }
    }

    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

fn decode_cursor(cursor: &str) -> Option<String> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let id = String::from_utf8(bytes).ok()?;
    uuid::Uuid::parse_str(&id).ok()?;
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_cursors_are_checked_and_name_the_field() {
        let bad = PageQuery {
            limit: Some(0),
            cursor: None,
        };
        assert_eq!(bad.check().unwrap_err().details[0].field, "limit");
        let bad = PageQuery {
            limit: None,
            cursor: Some("not a cursor".into()),
        };
        assert_eq!(bad.check().unwrap_err().details[0].field, "cursor");
    }

    #[test]
    fn a_full_page_carries_a_cursor_that_resumes_after_its_last_row() {
        let ids: Vec<String> = (0..5).map(|_| uuid::Uuid::now_v7().to_string()).collect();
        let request = PageQuery {
            limit: Some(2),
            cursor: None,
        }
        .check()
        .unwrap();
        let page = Page::from_rows(ids[..3].to_vec(), &request, |s| s.as_str());
        assert_eq!(page.items, ids[..2]);
        let next = PageQuery {
            limit: Some(2),
            cursor: page.next_cursor,
        }
        .check()
        .unwrap();
        assert_eq!(next.after.as_deref(), Some(ids[1].as_str()));
        let last = Page::from_rows(ids[4..].to_vec(), &next, |s| s.as_str());
        assert_eq!(last.next_cursor, None);
    }
}
