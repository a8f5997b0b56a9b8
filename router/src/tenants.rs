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
//! metrics = true               # may read /metrics; default false
//! ```
//!
//! Without the file the API, `/metrics` included, is open (local use). With it, every route
//! but `/health` needs a tenant's key, and `/metrics` (which names every tenant and its
//! usage) only answers tenants with `metrics = true`: 401 without a known key, 403 for others.
//!
//! Rate limits are token buckets refilled continuously. A request is checked twice: cheaply
//! before its prompt is tokenized ([`Tenant::precheck`]: a free concurrency slot, a request
//! and a token left), then in full once its size is known ([`Tenant::admit`]). Admission
//! reserves the most the request can use, `n × (prompt + max_tokens)` summed over its
//! prompts, so a bucket never goes below zero; a request whose reservation exceeds the
//! per-minute limit can never run and is a client error. Each choice holds its share in a
//! [`Reservation`] and gives back what it did not generate when it ends, however it ends.
//!
//! Keys are looked up by comparing the presented key's SHA-256 with every tenant's in
//! constant time, so response times say nothing about how close a guess was.
//!
//! A router that follows coordinators takes its tenants from them (`switchyard cluster
//! set-tenants FILE`), and their per-minute budgets are the coordinators' leader's
//! ([`Shared`]): every router takes a request's reservation from the same budget before
//! admitting it, and gives back what it did not use. Concurrency limits stay per router.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use metrics::counter;
use sha2::{Digest, Sha256};
use switchyard_coordinator::tenants::{Bucket, TenantSpec};

use crate::error::RouterError;

pub struct Tenant {
    pub name: String,
    pub priority: i32,
    /// May read `/metrics`.
    pub metrics: bool,
    max_concurrent: Option<u32>,
    active: AtomicU32,
    /// This router's own buckets (a tenants file), or none: see `shared`.
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
    /// The coordinators' budget, for a tenant they hold.
    shared: Option<Shared>,
}

/// A tenant's per-minute budget kept by the coordinators' leader, for every router at once.
pub struct Shared {
    client: switchyard_coordinator::client::Client,
    /// Where refunds are sent from (a reservation may be dropped on any thread).
    runtime: tokio::runtime::Handle,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    /// After a refusal: no request is asked for before this (the leader said when).
    retry_at: Mutex<Option<(Instant, String)>>,
}

/// Why a tenant's request is refused.
#[derive(Debug, thiserror::Error)]
#[error("tenant `{tenant}`: {what}")]
pub struct OverLimit {
    pub tenant: String,
    pub what: String,
    /// `Some(field)`: the request can never fit the limit, because of this field (a client
    /// error, not a reason to retry). `None`: over a limit for now; retry later.
    pub permanent: Option<&'static str>,
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

/// One choice's share of an admitted request: its prompt and up to `max_tokens` generated
/// tokens, taken from the tenant's token bucket at admission. What was not used goes back
/// when it is dropped (the prompt too, if the engine never accepted the choice).
pub struct Reservation {
    pub permit: Arc<Permit>,
    prompt: usize,
    max_tokens: usize,
    generated: usize,
    started: bool,
}

impl Reservation {
    pub fn tenant(&self) -> &Tenant {
        &self.permit.tenant
    }

    /// The engine accepted the choice: its prompt is spent.
    pub fn started(&mut self) {
        if !self.started {
            self.started = true;
            counter!(crate::metric_names::TENANT_PROMPT_TOKENS, "tenant" => self.tenant().name.clone())
                .increment(self.prompt as u64);
        }
    }

    /// The choice generated `n` more tokens (out of its reservation).
    pub fn generated(&mut self, n: usize) {
        let beyond = (self.generated + n).saturating_sub(self.max_tokens.max(self.generated));
        self.generated += n;
        if beyond > 0
            && let Some(b) = &self.tenant().tokens
        {
            // Not expected (the engine stops at max_tokens); charged, but only what is there.
            let mut b = b.lock().expect("bucket lock");
            b.refill();
            b.level = (b.level - beyond as f64).max(0.0);
        }
        counter!(crate::metric_names::TENANT_GENERATION_TOKENS, "tenant" => self.tenant().name.clone())
            .increment(n as u64);
    }

    /// Nothing of it was taken from a budget, so nothing goes back when it ends.
    fn owe_nothing(&mut self) {
        self.max_tokens = 0;
        self.started = true;
    }

    /// Tokens reserved and not used (yet).
    fn unused(&self) -> usize {
        let prompt = if self.started { 0 } else { self.prompt };
        prompt + self.max_tokens.saturating_sub(self.generated)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let unused = self.unused();
        if unused == 0 {
            return;
        }
        let tenant = self.tenant();
        if let Some(b) = &tenant.tokens {
            b.lock().expect("bucket lock").refund(unused as f64);
        }
        if let Some(shared) = &tenant.shared
            && shared.tokens_per_minute.is_some()
        {
            let (client, name) = (shared.client.clone(), tenant.name.clone());
            shared.runtime.spawn(async move {
                if let Err(status) = client.refund_budget(&name, unused as u64).await {
                    tracing::debug!(tenant = %name, "refund of {unused} tokens not delivered: {}", status.message());
                }
            });
        }
    }
}

impl Tenant {
    fn over(&self, what: String, permanent: Option<&'static str>) -> OverLimit {
        OverLimit { tenant: self.name.clone(), what, permanent }
    }

    /// The tokens-per-minute limit, if any.
    pub fn tokens_per_minute(&self) -> Option<usize> {
        match &self.shared {
            Some(shared) => shared.tokens_per_minute.map(|n| n as usize),
            None => self.tokens.as_ref().map(|b| b.lock().expect("bucket lock").capacity as usize),
        }
    }

    /// The cheap check before any work on the request: refuses it if the tenant has no
    /// concurrency slot free, no request or no token left in its buckets. Takes nothing.
    pub fn precheck(&self) -> Result<(), OverLimit> {
        if let Some(max) = self.max_concurrent
            && self.active.load(Ordering::Relaxed) >= max
        {
            return Err(self.over(format!("{max} concurrent requests at most"), None));
        }
        if let Some(shared) = &self.shared
            && let Some((at, limit)) = &*shared.retry_at.lock().expect("retry lock")
        {
            let wait = at.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                return Err(self.over(format!("{limit} at most; retry in {:.1}s", wait.as_secs_f64()), None));
            }
        }
        if let Some(b) = &self.requests {
            self.has_request(&mut b.lock().expect("bucket lock"))?;
        }
        if let Some(b) = &self.tokens {
            let mut b = b.lock().expect("bucket lock");
            let capacity = b.capacity;
            b.has(1.0).map_err(|wait| {
                self.over(format!("{capacity} tokens per minute at most; retry in {wait:.1}s"), None)
            })?;
        }
        Ok(())
    }

    /// Whether the request bucket `b` has a request left.
    fn has_request(&self, b: &mut Bucket) -> Result<(), OverLimit> {
        let capacity = b.capacity;
        b.has(1.0)
            .map_err(|wait| self.over(format!("{capacity} requests per minute at most; retry in {wait:.1}s"), None))
    }

    /// Admits one request of `n` choices for each prompt (of `prompts[i]` tokens), each
    /// generating at most `max_tokens`, or says which limit it is over. Reserves
    /// `n × Σ (prompt + max_tokens)` tokens; nothing is taken unless every limit admits it.
    /// Returns the choices' reservations, prompt by prompt (`p × n + i`). A tenant the
    /// coordinators hold takes the reservation from their budget, shared by every router.
    pub async fn admit(
        self: &Arc<Self>,
        prompts: &[usize],
        n: usize,
        max_tokens: usize,
    ) -> Result<Vec<Reservation>, OverLimit> {
        let reservations = self.admit_shared(self.admit_here(prompts, n, max_tokens)?).await?;
        counter!(crate::metric_names::TENANT_REQUESTS, "tenant" => self.name.clone()).increment(1);
        Ok(reservations)
    }

    /// Takes `reservations`' tokens (and a request) from the coordinators' budget of a tenant
    /// they hold; gives them back refused (dropping them takes nothing back) if it is short.
    async fn admit_shared(&self, mut reservations: Vec<Reservation>) -> Result<Vec<Reservation>, OverLimit> {
        let Some(shared) = &self.shared else { return Ok(reservations) };
        let reserve =
            reservations.iter().fold(0usize, |sum, r| sum.saturating_add(r.prompt.saturating_add(r.max_tokens)));
        let requests = u32::from(shared.requests_per_minute.is_some());
        let tokens = if shared.tokens_per_minute.is_some() { reserve as u64 } else { 0 };
        if requests == 0 && tokens == 0 {
            return Ok(reservations);
        }
        match shared.client.acquire_budget(&self.name, requests, tokens).await {
            Ok(grant) if grant.granted => Ok(reservations),
            Ok(grant) => {
                // Nothing was taken: the reservations must not refund what they never had.
                reservations.iter_mut().for_each(Reservation::owe_nothing);
                let wait = grant.retry_after_seconds.clamp(0.0, 60.0);
                let what = format!("{} at most and the request reserves {reserve}; retry in {wait:.1}s", grant.limit);
                *shared.retry_at.lock().expect("retry lock") =
                    Some((Instant::now() + Duration::from_secs_f64(wait), grant.limit));
                Err(self.over(what, None))
            }
            Err(status) => {
                // The coordinators are out of reach: serve rather than fail every request;
                // the budget holds again once they answer.
                reservations.iter_mut().for_each(Reservation::owe_nothing);
                tracing::warn!(tenant = %self.name, "the coordinators' budget is out of reach, admitted unchecked: {}", status.message());
                counter!(crate::metric_names::TENANT_UNCHECKED, "tenant" => self.name.clone()).increment(1);
                Ok(reservations)
            }
        }
    }

    /// [`Tenant::admit`]'s checks against this router's own limits (concurrency, its buckets,
    /// and a reservation that can never fit).
    pub fn admit_here(
        self: &Arc<Self>,
        prompts: &[usize],
        n: usize,
        max_tokens: usize,
    ) -> Result<Vec<Reservation>, OverLimit> {
        let reserve =
            prompts.iter().fold(0usize, |sum, &p| sum.saturating_add(p.saturating_add(max_tokens))).saturating_mul(n);
        if let Some(capacity) = self.tokens_per_minute()
            && reserve > capacity
        {
            return Err(self.too_big(prompts, n, max_tokens, reserve, capacity));
        }
        let active = self.active.fetch_add(1, Ordering::Relaxed) + 1;
        let permit = Arc::new(Permit { tenant: self.clone() });
        if let Some(max) = self.max_concurrent
            && active > max
        {
            return Err(self.over(format!("{max} concurrent requests at most"), None));
        }
        let mut requests = self.requests.as_ref().map(|b| b.lock().expect("bucket lock"));
        let mut token_bucket = self.tokens.as_ref().map(|b| b.lock().expect("bucket lock"));
        if let Some(b) = requests.as_deref_mut() {
            self.has_request(b)?;
        }
        if let Some(b) = token_bucket.as_deref_mut() {
            let capacity = b.capacity;
            b.has(reserve as f64).map_err(|wait| {
                let what = format!(
                    "{capacity} tokens per minute at most and the request reserves {reserve} (n × (prompt + max_tokens)); \
                     retry in {wait:.1}s"
                );
                self.over(what, None)
            })?;
        }
        if let Some(b) = requests.as_deref_mut() {
            b.level -= 1.0;
        }
        if let Some(b) = token_bucket.as_deref_mut() {
            b.level -= reserve as f64;
        }
        let reservation =
            |&prompt: &usize| Reservation { permit: permit.clone(), prompt, max_tokens, generated: 0, started: false };
        Ok(prompts.iter().flat_map(|p| std::iter::repeat_n(p, n)).map(reservation).collect())
    }

    /// Why a reservation of `reserve` can never fit `capacity`, and what would.
    fn too_big(&self, prompts: &[usize], n: usize, max_tokens: usize, reserve: usize, capacity: usize) -> OverLimit {
        let choices = prompts.len() * n;
        let prompt_total = prompts.iter().sum::<usize>().saturating_mul(n);
        let max_tokens_text = if max_tokens == usize::MAX { "unbounded".to_string() } else { max_tokens.to_string() };
        let need = format!(
            "the request needs {reserve} tokens ({choices} choice(s) × (prompt + `max_tokens` {max_tokens_text})) \
             but the limit is {capacity} tokens per minute"
        );
        let fits = capacity.saturating_sub(prompt_total) / choices;
        let per_n = prompts.iter().sum::<usize>() + prompts.len();
        if fits >= 1 {
            self.over(format!("{need}; lower `max_tokens` to {fits} or less"), Some("max_tokens"))
        } else if per_n <= capacity {
            let n_fits = capacity / per_n;
            self.over(format!("{need}; lower `n` to {n_fits} or less (and `max_tokens` with it)"), Some("n"))
        } else {
            self.over(format!("{need}; the prompts alone need {}: shorten them", prompt_total / n), Some("prompt"))
        }
    }
}

/// Why a caller is no tenant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoTenant {
    MissingKey,
    InvalidKey,
}

/// The tenants of a router, each with the SHA-256 of its key.
pub struct Tenants {
    by_key: Vec<([u8; 32], Arc<Tenant>)>,
}

/// The tenants a router serves now: from its tenants file, fixed; from the coordinators,
/// replaced when they change (`None`: no tenants, the APIs are open).
#[derive(Default)]
pub struct TenantList(RwLock<Option<Arc<Tenants>>>);

impl TenantList {
    pub fn fixed(tenants: Option<Tenants>) -> Self {
        TenantList(RwLock::new(tenants.map(Arc::new)))
    }

    pub fn get(&self) -> Option<Arc<Tenants>> {
        self.0.read().expect("tenants lock").clone()
    }

    pub fn set(&self, tenants: Option<Tenants>) {
        *self.0.write().expect("tenants lock") = tenants.map(Arc::new);
    }
}

/// Keeps `list` to the coordinators' tenants: waits, at most `wait`, for their placement
/// (whose tenants it takes before the router serves), then follows every change.
pub async fn follow(
    client: switchyard_coordinator::client::Client,
    list: Arc<TenantList>,
    wait: Duration,
) -> Result<(), RouterError> {
    let mut placements = client.watch();
    let runtime = tokio::runtime::Handle::current();
    let apply = move |specs: &[TenantSpec], list: &TenantList| {
        let tenants = (!specs.is_empty()).then(|| Tenants::new(specs, Some((&client, &runtime))));
        tracing::info!(tenants = specs.len(), "tenants from the coordinators");
        list.set(tenants);
    };
    let first = tokio::time::timeout(wait, placements.wait_for(Option::is_some))
        .await
        .map_err(|_| RouterError::Config("the coordinators sent no placement, so no tenants".into()))?
        .map_err(|_| RouterError::Config("the placement watch ended".into()))?
        .clone()
        .expect("waited for one");
    let specs = |p: &switchyard_proto::v1::Placement| -> Vec<TenantSpec> {
        p.tenants.iter().map(switchyard_coordinator::convert::tenant_spec).collect()
    };
    let mut current = specs(&first);
    apply(&current, &list);
    tokio::spawn(async move {
        while placements.changed().await.is_ok() {
            let Some(p) = placements.borrow_and_update().clone() else { continue };
            let next = specs(&p);
            if next != current {
                apply(&next, &list);
                current = next;
            }
        }
    });
    Ok(())
}

/// The SHA-256 of an API key, as stored in the tenants file.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Tenants {
    /// The tenants of a tenants file, with this router's own buckets.
    pub fn load(path: &Path) -> Result<Self, RouterError> {
        let bad = |why: String| RouterError::Config(format!("{}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let specs = switchyard_coordinator::tenants::parse(&text).map_err(bad)?;
        Ok(Tenants::new(&specs, None))
    }

    /// Tenants from checked specs; with `shared`, their per-minute budgets are the
    /// coordinators' (see [`Shared`]), else this router's own.
    pub fn new(
        specs: &[TenantSpec],
        shared: Option<(&switchyard_coordinator::client::Client, &tokio::runtime::Handle)>,
    ) -> Self {
        let by_key = specs
            .iter()
            .filter_map(|t| {
                let key = switchyard_coordinator::tenants::key_hash(&t.api_key_sha256)?;
                let (requests, tokens, shared) = match shared {
                    Some((client, runtime)) => (
                        None,
                        None,
                        Some(Shared {
                            client: client.clone(),
                            runtime: runtime.clone(),
                            requests_per_minute: t.requests_per_minute,
                            tokens_per_minute: t.tokens_per_minute,
                            retry_at: Mutex::new(None),
                        }),
                    ),
                    None => (
                        t.requests_per_minute.map(|n| Mutex::new(Bucket::new(n))),
                        t.tokens_per_minute.map(|n| Mutex::new(Bucket::new(n))),
                        None,
                    ),
                };
                let tenant = Tenant {
                    requests,
                    tokens,
                    shared,
                    max_concurrent: t.max_concurrent,
                    priority: t.priority,
                    metrics: t.metrics,
                    active: AtomicU32::new(0),
                    name: t.name.clone(),
                };
                Some((key, Arc::new(tenant)))
            })
            .collect();
        Tenants { by_key }
    }

    /// The tenant an `Authorization` value (`Bearer KEY`) names; both front ends call this.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Tenant>, NoTenant> {
        let key = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .ok_or(NoTenant::MissingKey)?;
        self.find(key.trim()).ok_or(NoTenant::InvalidKey)
    }

    /// The tenant whose key is `key`. Compares the key's hash with every tenant's, each in
    /// constant time, and never stops early.
    pub fn find(&self, key: &str) -> Option<Arc<Tenant>> {
        let hash = hash_key(key);
        let mut found = None;
        for (stored, tenant) in &self.by_key {
            if switchyard_proto::server::same_secret(stored, &hash) {
                found = Some(tenant.clone());
            }
        }
        found
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
            metrics: false,
            max_concurrent: conc,
            active: AtomicU32::new(0),
            requests: rpm.map(|n| Mutex::new(Bucket::new(n))),
            tokens: tpm.map(|n| Mutex::new(Bucket::new(n))),
            shared: None,
        })
    }

    fn level(t: &Tenant) -> f64 {
        let mut b = t.tokens.as_ref().unwrap().lock().unwrap();
        b.refill();
        b.level
    }

    #[test]
    fn limits_refuse_what_is_over_and_free_on_drop() {
        let t = tenant(Some(2), None, None);
        let _a = t.admit_here(&[1], 1, 1).unwrap();
        let _b = t.admit_here(&[1], 1, 1).unwrap();
        assert!(t.precheck().err().unwrap().to_string().contains("2 requests per minute"));
        assert!(t.admit_here(&[1], 1, 1).err().unwrap().to_string().contains("2 requests per minute"));

        let t = tenant(None, None, Some(1));
        let a = t.admit_here(&[1], 1, 1).unwrap();
        assert!(t.precheck().err().unwrap().to_string().contains("1 concurrent"));
        assert!(t.admit_here(&[1], 1, 1).err().unwrap().to_string().contains("1 concurrent"));
        drop(a);
        assert!(t.precheck().is_ok());
        assert!(t.admit_here(&[1], 1, 1).is_ok());
    }

    #[test]
    fn admission_reserves_n_times_prompt_plus_max_tokens() {
        let t = tenant(None, Some(200), None);
        // 2 prompts of 10 and 20 tokens, n = 3, max_tokens 5: 3 × (15 + 25) = 120.
        let r = t.admit_here(&[10, 20], 3, 5).unwrap();
        assert_eq!(r.len(), 6);
        assert!((level(&t) - 80.0).abs() < 0.1, "{}", level(&t));
        // 80 left: a request reserving 81 waits, and says for how long.
        let err = t.admit_here(&[1], 1, 80).err().unwrap();
        assert!(err.permanent.is_none() && err.to_string().contains("reserves 81"), "{err}");
        assert!(t.admit_here(&[1], 1, 79).is_ok());
    }

    #[test]
    fn a_reservation_over_the_limit_is_refused_for_good_naming_max_tokens() {
        let t = tenant(None, Some(200), None);
        let err = t.admit_here(&[1], 1, 1000).err().unwrap();
        assert_eq!(err.permanent, Some("max_tokens"));
        let text = err.to_string();
        assert!(text.contains("needs 1001 tokens") && text.contains("limit is 200"), "{text}");
        assert!(text.contains("lower `max_tokens` to 199"), "{text}");
        let err = t.admit_here(&[1], 128, 1000).err().unwrap();
        assert_eq!(err.permanent, Some("n"));
        assert!(err.to_string().contains("needs 128128") && err.to_string().contains("`n` to 100 or less"), "{err}");
        let err = t.admit_here(&[150, 150], 1, 1).err().unwrap();
        assert_eq!(err.permanent, Some("prompt"));
        // Nothing was taken by the refusals.
        assert!((level(&t) - 200.0).abs() < 0.1);
        assert_eq!(t.active.load(Ordering::Relaxed), 0);
        // A max_tokens of "no limit" is refused, not overflowed.
        assert!(t.admit_here(&[1], 2, usize::MAX).err().unwrap().permanent.is_some());
    }

    #[test]
    fn what_a_choice_does_not_generate_goes_back_and_the_bucket_never_goes_negative() {
        let t = tenant(None, Some(200), None);
        let mut r = t.admit_here(&[10], 2, 90).unwrap();
        assert!(level(&t) < 0.1);
        let (mut a, mut b) = (r.remove(0), r.remove(0));
        a.started();
        b.started();
        a.generated(30);
        b.generated(90);
        // A generates 30 of its 90 (stopped early, or the client left): 60 come back.
        drop(a);
        assert!((level(&t) - 60.0).abs() < 0.1, "{}", level(&t));
        drop(b);
        assert!((level(&t) - 60.0).abs() < 0.1, "{}", level(&t));
        // A choice the engine never accepted gives back its prompt too.
        let r = t.admit_here(&[10], 1, 50).unwrap();
        assert!(level(&t) < 0.1 + 0.0);
        drop(r);
        assert!((level(&t) - 60.0).abs() < 0.1);
        // Even tokens past the reservation (not expected) never take the bucket below zero.
        let mut r = t.admit_here(&[10], 1, 50).unwrap();
        r[0].started();
        r[0].generated(500);
        assert!(level(&t) >= 0.0);
        drop(r);
        assert!(level(&t) >= 0.0 && level(&t) < 1.0);
    }

    #[test]
    fn the_empty_bucket_is_refused_before_any_work() {
        let t = tenant(None, Some(100), None);
        let _r = t.admit_here(&[50], 1, 50).unwrap();
        let err = t.precheck().err().unwrap();
        assert!(err.to_string().contains("100 tokens per minute") && err.permanent.is_none());
    }

    #[test]
    fn keys_are_matched_by_hash_against_every_tenant() {
        let dir = std::env::temp_dir().join(format!("switchyard-tenants-{}", std::process::id()));
        let hex = |k: &str| hash_key(k).iter().map(|b| format!("{b:02x}")).collect::<String>();
        let file = format!(
            "[[tenant]]\nname = \"a\"\napi_key_sha256 = \"{}\"\n\n[[tenant]]\nname = \"b\"\napi_key_sha256 = \"{}\"\nmetrics = true\n",
            hex("secret"),
            hex("other")
        );
        std::fs::write(&dir, file).unwrap();
        let tenants = Tenants::load(&dir).unwrap();
        assert_eq!(tenants.find("secret").unwrap().name, "a");
        assert!(!tenants.find("secret").unwrap().metrics);
        assert!(tenants.find("other").unwrap().metrics);
        assert!(tenants.find("guess").is_none());
        assert!(tenants.find("").is_none());
        std::fs::write(&dir, "[[tenant]]\nname = \"a\"\napi_key_sha256 = \"zz\"\n").unwrap();
        assert!(Tenants::load(&dir).err().unwrap().to_string().contains("64 hex digits"));
        std::fs::write(&dir, format!("[[tenant]]\nname = \"a\"\napi_key_sha256 = \"{}\"\nmetric = 1\n", hex("x")))
            .unwrap();
        assert!(Tenants::load(&dir).err().unwrap().to_string().contains("unknown field"));
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn the_comparison_looks_at_every_byte() {
        let a = hash_key("a");
        let mut b = a;
        assert!(switchyard_proto::server::same_secret(&a, &b));
        for i in [0, 15, 31] {
            b = a;
            b[i] ^= 1;
            assert!(!switchyard_proto::server::same_secret(&a, &b), "a difference in byte {i}");
        }
    }
}
