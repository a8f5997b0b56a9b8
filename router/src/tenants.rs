//! Tenants: who may call the HTTP API and how much. `--tenants FILE` (TOML) lists them, each
//! with the SHA-256 of its API key (keys themselves are never stored), limits and a priority:
//!
//! ```toml
//! [[tenant]]
//! name = "acme"
//! api_key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! requests_per_minute = 600    # optional; absent: unlimited
//! tokens_per_minute = 100000   # prompt + generated tokens; optional
//! max_concurrent = 16          # requests in flight; optional
//! priority = 1                 # higher is admitted first; default 0
//! ```
//!
//! Without the file the API is open (local use). Rate limits are token buckets refilled
//! continuously; a request over any limit is refused with 429 before it is queued.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metrics::counter;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::RouterError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantSpec {
    name: String,
    api_key_sha256: String,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    max_concurrent: Option<u32>,
    #[serde(default)]
    priority: i32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenant: Vec<TenantSpec>,
}

/// A bucket of `capacity` that refills at `capacity` per minute; it may go negative when a
/// request uses more tokens than it was charged up front.
struct Bucket {
    capacity: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u32) -> Self {
        Bucket { capacity: f64::from(per_minute), level: f64::from(per_minute), at: Instant::now() }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.level = (self.level + (now - self.at).as_secs_f64() * self.capacity / 60.0).min(self.capacity);
        self.at = now;
    }

    /// Seconds until `amount` is available.
    fn wait_for(&self, amount: f64) -> f64 {
        ((amount - self.level) * 60.0 / self.capacity).max(0.0)
    }
}

pub struct Tenant {
    pub name: String,
    pub priority: i32,
    max_concurrent: Option<u32>,
    active: AtomicU32,
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
}

/// Why a tenant's request is refused for now.
#[derive(Debug, thiserror::Error)]
#[error("tenant `{tenant}`: {what}")]
pub struct OverLimit {
    pub tenant: String,
    pub what: String,
    /// The request can never fit the limit (a client error, not a reason to retry).
    pub permanent: bool,
}

/// Holds one of a tenant's concurrent-request slots; frees it when dropped.
pub struct Permit {
    pub tenant: Arc<Tenant>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.tenant.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tenant {
    /// Admits one request that will use about `tokens` tokens, or says which limit it is
    /// over. Nothing is charged unless every limit admits it.
    pub fn admit(self: &Arc<Self>, tokens: usize) -> Result<Permit, OverLimit> {
        let over = |what: String, permanent: bool| OverLimit { tenant: self.name.clone(), what, permanent };
        if let Some(b) = &self.tokens {
            let capacity = b.lock().expect("bucket lock").capacity;
            if tokens as f64 > capacity {
                let what = format!("the request needs {tokens} tokens but the limit is {capacity} tokens per minute");
                return Err(over(what, true));
            }
        }
        let active = self.active.fetch_add(1, Ordering::Relaxed) + 1;
        let permit = Permit { tenant: self.clone() };
        if let Some(max) = self.max_concurrent
            && active > max
        {
            return Err(over(format!("{max} concurrent requests at most"), false));
        }
        let mut requests = self.requests.as_ref().map(|b| b.lock().expect("bucket lock"));
        let mut token_bucket = self.tokens.as_ref().map(|b| b.lock().expect("bucket lock"));
        if let Some(b) = requests.as_deref_mut() {
            b.refill();
            if b.level < 1.0 {
                let what = format!("{} requests per minute at most; retry in {:.1}s", b.capacity, b.wait_for(1.0));
                return Err(over(what, false));
            }
        }
        if let Some(b) = token_bucket.as_deref_mut() {
            b.refill();
            if b.level < tokens as f64 {
                let what =
                    format!("{} tokens per minute at most; retry in {:.1}s", b.capacity, b.wait_for(tokens as f64));
                return Err(over(what, false));
            }
        }
        if let Some(b) = requests.as_deref_mut() {
            b.level -= 1.0;
        }
        if let Some(b) = token_bucket.as_deref_mut() {
            b.level -= tokens as f64;
        }
        counter!(crate::metric_names::TENANT_REQUESTS, "tenant" => self.name.clone()).increment(1);
        counter!(crate::metric_names::TENANT_PROMPT_TOKENS, "tenant" => self.name.clone()).increment(tokens as u64);
        Ok(permit)
    }

    /// Charges `n` generated tokens to the tenant's token budget.
    pub fn charge(&self, n: usize) {
        if let Some(b) = &self.tokens {
            b.lock().expect("bucket lock").level -= n as f64;
        }
        counter!(crate::metric_names::TENANT_GENERATION_TOKENS, "tenant" => self.name.clone()).increment(n as u64);
    }
}

/// The tenants of a router, by hashed API key.
pub struct Tenants {
    by_key: HashMap<[u8; 32], Arc<Tenant>>,
}

/// The SHA-256 of an API key, as stored in the tenants file.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Tenants {
    pub fn load(path: &Path) -> Result<Self, RouterError> {
        let bad = |why: String| RouterError::Config(format!("{}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file: TenantsFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if file.tenant.is_empty() {
            return Err(bad("no [[tenant]] defined".into()));
        }
        let mut by_key = HashMap::new();
        for t in file.tenant {
            if [t.requests_per_minute, t.tokens_per_minute, t.max_concurrent].contains(&Some(0)) {
                return Err(bad(format!(
                    "tenant `{}`: limits must be at least 1 (leave a limit out for none)",
                    t.name
                )));
            }
            let key = parse_hex(&t.api_key_sha256)
                .ok_or_else(|| bad(format!("tenant `{}`: api_key_sha256 must be 64 hex digits", t.name)))?;
            let tenant = Tenant {
                requests: t.requests_per_minute.map(|n| Mutex::new(Bucket::new(n))),
                tokens: t.tokens_per_minute.map(|n| Mutex::new(Bucket::new(n))),
                max_concurrent: t.max_concurrent,
                priority: t.priority,
                active: AtomicU32::new(0),
                name: t.name,
            };
            if by_key.insert(key, Arc::new(tenant)).is_some() {
                return Err(bad("two tenants share an API key".into()));
            }
        }
        Ok(Tenants { by_key })
    }

    /// The tenant whose key is `key`.
    pub fn find(&self, key: &str) -> Option<Arc<Tenant>> {
        self.by_key.get(&hash_key(key)).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(rpm: Option<u32>, tpm: Option<u32>, conc: Option<u32>) -> Arc<Tenant> {
        Arc::new(Tenant {
            name: "t".into(),
            priority: 0,
            max_concurrent: conc,
            active: AtomicU32::new(0),
            requests: rpm.map(|n| Mutex::new(Bucket::new(n))),
            tokens: tpm.map(|n| Mutex::new(Bucket::new(n))),
        })
    }

    #[test]
    fn limits_refuse_what_is_over_and_free_on_drop() {
        let t = tenant(Some(2), None, None);
        let _a = t.admit(1).unwrap();
        let _b = t.admit(1).unwrap();
        assert!(t.admit(1).err().unwrap().to_string().contains("2 requests per minute"));

        let t = tenant(None, None, Some(1));
        let a = t.admit(1).unwrap();
        assert!(t.admit(1).err().unwrap().to_string().contains("1 concurrent"));
        drop(a);
        assert!(t.admit(1).is_ok());

        let t = tenant(None, Some(100), None);
        let _a = t.admit(60).unwrap();
        t.charge(50);
        let err = t.admit(1).err().unwrap();
        assert!(err.to_string().contains("100 tokens per minute") && !err.permanent);
        let err = t.admit(101).err().unwrap();
        assert!(err.permanent && err.to_string().contains("needs 101 tokens"));
    }

    #[test]
    fn keys_are_matched_by_hash() {
        let dir = std::env::temp_dir().join(format!("switchyard-tenants-{}", std::process::id()));
        let hex: String = hash_key("secret").iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&dir, format!("[[tenant]]\nname = \"a\"\napi_key_sha256 = \"{hex}\"\n")).unwrap();
        let tenants = Tenants::load(&dir).unwrap();
        assert_eq!(tenants.find("secret").unwrap().name, "a");
        assert!(tenants.find("guess").is_none());
        std::fs::write(&dir, "[[tenant]]\nname = \"a\"\napi_key_sha256 = \"zz\"\n").unwrap();
        assert!(Tenants::load(&dir).err().unwrap().to_string().contains("64 hex digits"));
        std::fs::remove_file(&dir).unwrap();
    }
}
