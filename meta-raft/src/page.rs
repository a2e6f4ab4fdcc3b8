//! Listings in pages: a page size checked against the limits, and a page
//! token that names the last key of the previous page.

use std::collections::BTreeMap;
use std::ops::Bound;

use ballast_proto::volume::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PAGE_TOKEN_PREFIX};

use crate::error::MetaError;

/// One page of a listing in key order.
pub struct Page<T> {
    pub items: Vec<T>,
    /// Key to pass back to continue after this page; `None` at the end.
    pub next: Option<String>,
}

/// Checks a page size; 0 selects the default.
pub fn page_size(requested: u32) -> Result<usize, MetaError> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        n if n > MAX_PAGE_SIZE => {
            Err(MetaError::invalid(format!("page size {n} exceeds the maximum of {MAX_PAGE_SIZE}")))
        }
        n => Ok(n as usize),
    }
}

/// Returns the entries of `map` that pass `keep`, in key order, starting
/// after the key encoded in `token`.
pub fn paginate<T: Clone>(
    map: &BTreeMap<String, T>,
    keep: impl Fn(&T) -> bool,
    token: &str,
    size: usize,
) -> Result<Page<T>, MetaError> {
    let start = if token.is_empty() {
        Bound::Unbounded
    } else {
        let key = token
            .strip_prefix(PAGE_TOKEN_PREFIX)
            .ok_or_else(|| MetaError::invalid(format!("page token {token:?} was not issued by this service")))?;
        Bound::Excluded(key)
    };
    let mut page: Vec<(&String, &T)> =
        map.range::<str, _>((start, Bound::Unbounded)).filter(|(_, v)| keep(v)).take(size + 1).collect();
    let next = if page.len() > size {
        page.truncate(size);
        page.last().map(|(k, _)| format!("{PAGE_TOKEN_PREFIX}{k}"))
    } else {
        None
    };
    Ok(Page { items: page.into_iter().map(|(_, v)| v.clone()).collect(), next })
}
