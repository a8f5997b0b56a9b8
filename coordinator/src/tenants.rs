//! Tenants as the cluster keeps them: the tenants file's entries ([`TenantSpec`]), checked
//! once here for every router, replicated in the coordinators' state (`SetTenants`), and the
//! per-minute budgets the leader keeps for them ([`Budgets`]), so that any number of routers
//! admit one tenant's requests against one budget.
//!
//! A budget is a token bucket ([`Bucket`]) refilled continuously; it lives in the leader's
//! memory, not in the raft log (a request's admission is not worth a consensus round). A new
//! leader starts every bucket full: at a leader change a tenant can get up to one more
//! minute's budget.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One tenant: who (the SHA-256 of its API key; keys themselves are never stored) and how much.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub name: String,
    pub api_key_sha256: String,
    /// Absent: no limit.
    pub requests_per_minute: Option<u32>,
    /// Prompt plus generated tokens.
    pub tokens_per_minute: Option<u32>,
    /// Requests in flight at once (per router).
    pub max_concurrent: Option<u32>,
    /// Higher is admitted first.
    #[serde(default)]
    pub priority: i32,
    /// May read `/metrics` and the cluster's status.
    #[serde(default)]
    pub metrics: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenant: Vec<TenantSpec>,
}

/// The `[[tenant]]` entries of a tenants file (TOML), checked.
pub fn parse(text: &str) -> Result<Vec<TenantSpec>, String> {
    let file: TenantsFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if file.tenant.is_empty() {
        return Err("no [[tenant]] defined".into());
    }
    validate(&file.tenant)?;
    Ok(file.tenant)
}

/// Refuses tenants with a zero limit, a key hash that is not 64 hex digits, or a name or key
/// that two share.
pub fn validate(tenants: &[TenantSpec]) -> Result<(), String> {
    for (i, t) in tenants.iter().enumerate() {
        if t.name.is_empty() {
            return Err(format!("tenant {}: `name` is empty", i + 1));
        }
        if [t.requests_per_minute, t.tokens_per_minute, t.max_concurrent].contains(&Some(0)) {
            return Err(format!("tenant `{}`: limits must be at least 1 (leave a limit out for none)", t.name));
        }
        if key_hash(&t.api_key_sha256).is_none() {
            return Err(format!("tenant `{}`: api_key_sha256 must be 64 hex digits", t.name));
        }
        if tenants[..i].iter().any(|o| o.name == t.name) {
            return Err(format!("two tenants are named `{}`", t.name));
        }
        if tenants[..i].iter().any(|o| key_hash(&o.api_key_sha256) == key_hash(&t.api_key_sha256)) {
            return Err(format!("tenant `{}` shares its API key with another tenant", t.name));
        }
    }
    Ok(())
}

/// The 32 bytes of a key hash given as 64 hex digits.
pub fn key_hash(hex: &str) -> Option<[u8; 32]> {
    let s = hex.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A bucket of `capacity` that refills at `capacity` per minute. Only what it holds is ever
/// taken from it, so it never goes below zero.
#[derive(Debug)]
pub struct Bucket {
    pub capacity: f64,
    pub level: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(per_minute: u32) -> Self {
        Bucket { capacity: f64::from(per_minute), level: f64::from(per_minute), at: Instant::now() }
    }

    pub fn refill(&mut self) {
        let now = Instant::now();
        self.level = (self.level + (now - self.at).as_secs_f64() * self.capacity / 60.0).min(self.capacity);
        self.at = now;
    }

    /// Seconds until `amount` is available.
    pub fn wait_for(&self, amount: f64) -> f64 {
        ((amount - self.level) * 60.0 / self.capacity).max(0.0)
    }

    /// Refills, then `Err(seconds to wait)` unless `amount` is there now. Takes nothing.
    pub fn has(&mut self, amount: f64) -> Result<(), f64> {
        self.refill();
        if self.level < amount { Err(self.wait_for(amount)) } else { Ok(()) }
    }

    /// Gives back `amount` taken earlier (never above capacity).
    pub fn refund(&mut self, amount: f64) {
        self.refill();
        self.level = (self.level + amount).min(self.capacity);
    }
}

/// Why a budget request was refused: which limit, and when it has room.
#[derive(Debug, PartialEq)]
pub struct Short {
    pub limit: String,
    pub retry_after_seconds: f64,
}

/// The leader's buckets, one pair per tenant with limits.
#[derive(Default)]
pub struct Budgets {
    tenants: Mutex<HashMap<String, TenantBuckets>>,
}

struct TenantBuckets {
    limits: (Option<u32>, Option<u32>),
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl TenantBuckets {
    fn new(spec: &TenantSpec) -> Self {
        TenantBuckets {
            limits: (spec.requests_per_minute, spec.tokens_per_minute),
            requests: spec.requests_per_minute.map(Bucket::new),
            tokens: spec.tokens_per_minute.map(Bucket::new),
        }
    }
}

impl Budgets {
    /// Takes `requests` and `tokens` from `spec`'s buckets if both have them now; else takes
    /// nothing and says which is short.
    pub fn acquire(&self, spec: &TenantSpec, requests: u32, tokens: u64) -> Result<(), Short> {
        let mut all = self.tenants.lock().expect("budgets lock");
        let buckets = all.entry(spec.name.clone()).or_insert_with(|| TenantBuckets::new(spec));
        if buckets.limits != (spec.requests_per_minute, spec.tokens_per_minute) {
            *buckets = TenantBuckets::new(spec);
        }
        if let Some(b) = &mut buckets.requests {
            b.has(f64::from(requests)).map_err(|wait| Short {
                limit: format!("{} requests per minute", b.capacity),
                retry_after_seconds: wait,
            })?;
        }
        if let Some(b) = &mut buckets.tokens {
            b.has(tokens as f64).map_err(|wait| Short {
                limit: format!("{} tokens per minute", b.capacity),
                retry_after_seconds: wait,
            })?;
        }
        if let Some(b) = &mut buckets.requests {
            b.level -= f64::from(requests);
        }
        if let Some(b) = &mut buckets.tokens {
            b.level -= tokens as f64;
        }
        Ok(())
    }

    /// Gives back `tokens` of `tenant`'s that were reserved and not used.
    pub fn refund(&self, tenant: &str, tokens: u64) {
        let mut all = self.tenants.lock().expect("budgets lock");
        if let Some(b) = all.get_mut(tenant).and_then(|t| t.tokens.as_mut()) {
            b.refund(tokens as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, key: char, tokens: Option<u32>) -> TenantSpec {
        TenantSpec {
            name: name.into(),
            api_key_sha256: key.to_string().repeat(64),
            requests_per_minute: Some(10),
            tokens_per_minute: tokens,
            max_concurrent: None,
            priority: 0,
            metrics: false,
        }
    }

    #[test]
    fn one_budget_is_taken_whole_or_not_at_all_and_refunded() {
        let budgets = Budgets::default();
        let acme = tenant("acme", 'a', Some(100));
        assert!(budgets.acquire(&acme, 1, 60).is_ok());
        let short = budgets.acquire(&acme, 1, 60).unwrap_err();
        assert_eq!(short.limit, "100 tokens per minute");
        assert!(short.retry_after_seconds > 10.0, "{short:?}");
        // The refused request took no request either: 9 left, then 8 after this one.
        assert!(budgets.acquire(&acme, 1, 40).is_ok());
        budgets.refund("acme", 50);
        assert!(budgets.acquire(&acme, 1, 50).is_ok());
        // Another tenant has its own budget.
        assert!(budgets.acquire(&tenant("other", 'b', Some(100)), 1, 100).is_ok());
    }

    #[test]
    fn tenants_files_are_checked_with_the_field_named() {
        let ok = "[[tenant]]\nname = \"a\"\napi_key_sha256 = \"".to_string() + &"a".repeat(64) + "\"\n";
        assert_eq!(parse(&ok).unwrap().len(), 1);
        assert!(parse(&ok.replace("name", "nmae")).unwrap_err().contains("nmae"));
        let zero = format!("{ok}tokens_per_minute = 0\n");
        assert!(parse(&zero).unwrap_err().contains("at least 1"));
        let twice = format!("{ok}{}", ok.replace("\"a\"\n", "\"b\"\n"));
        assert!(parse(&twice).unwrap_err().contains("shares its API key"), "{}", parse(&twice).unwrap_err());
        assert!(parse("").unwrap_err().contains("no [[tenant]]"));
    }
}
