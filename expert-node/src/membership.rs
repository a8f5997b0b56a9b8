//! Membership in a coordinated cluster: the node registers with the coordinator group, sends
//! heartbeats (with the newest epoch it has fully loaded) and follows the placement, loading
//! the experts any live epoch gives it before confirming and dropping the ones no epoch
//! names any more. A node the coordinator declared dead registers again under a new id; a
//! node whose compute thread failed stops its heartbeats for good, so the coordinators
//! declare it dead and re-place its experts.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_coordinator::client::Client;
use switchyard_coordinator::convert::{active, held_by, newest_epoch};
use switchyard_proto::v1::{EpochState, ModelShape, NodeHeartbeat, Placement, RegisterNodeRequest};

use crate::compute::Compute;
use crate::store::Catalog;

/// Between heartbeats; the coordinator declares a node dead after several missed ones.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);

/// Why the heartbeats stopped.
enum Silence {
    /// The coordinators no longer know the node: register again.
    DeclaredDead,
    /// The node failed: stay silent.
    Failed,
}

/// Registers `address` with the coordinators and keeps the store on the placement, until
/// the task is dropped or the node fails.
/// `placed` says whether the node is ready: in the active epoch, holding what it gives it.
pub async fn run(client: Client, compute: Compute, address: String, placed: Arc<Mutex<Result<(), String>>>) {
    let set = |why: Result<(), String>| *placed.lock().expect("placed lock") = why;
    let catalog = compute.catalog().clone();
    let spec = catalog.spec();
    let model = ModelShape {
        model_type: catalog.model_type().to_string(),
        num_layers: spec.num_layers as u32,
        moe_layers: spec
            .layer_mlps
            .iter()
            .enumerate()
            .filter(|(_, m)| **m == switchyard_model::config::LayerMlp::Moe)
            .map(|(l, _)| l as u32)
            .collect(),
        num_experts: spec.num_experts as u32,
        hidden_size: spec.hidden_size as u32,
        expert_bytes: catalog.expert_bytes() as u64,
    };
    let budget = catalog.budget().unwrap_or(0) as u64;
    let request = RegisterNodeRequest { address: address.clone(), memory_budget: budget, model: Some(model) };
    let mut placements = client.watch();
    loop {
        let id = loop {
            match client.register(request.clone()).await {
                Ok(id) => break id,
                Err(status) => {
                    tracing::warn!("cannot register with the coordinators: {}", status.message());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        tracing::info!(node = id, %address, "registered with the coordinators");
        set(Err(format!("registered as node {id}; no active epoch places it yet")));
        let loaded = Arc::new(AtomicU64::new(0));
        let mut heartbeats = tokio::spawn(heartbeat(client.clone(), id, loaded.clone(), compute.clone()));
        placements.mark_changed();
        let silence = loop {
            tokio::select! {
                silence = &mut heartbeats => break silence.unwrap_or(Silence::Failed),
                changed = placements.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let Some(placement) = placements.borrow_and_update().clone() else { continue };
                    let target = target(&placement, id, &catalog);
                    let epoch = newest_epoch(&placement);
                    match compute.place(target).await {
                        Ok(()) => {
                            loaded.fetch_max(epoch, Ordering::Relaxed);
                            tracing::debug!(node = id, epoch, "placement loaded");
                            let in_active = active(&placement).is_some_and(|(_, a)| a.values().any(|n| n.contains(&id)));
                            set(if in_active {
                                Ok(())
                            } else {
                                Err(format!("node {id} is in no active epoch"))
                            });
                        }
                        Err(e) => {
                            tracing::error!(node = id, epoch, "cannot load the placement: {e}");
                            set(Err(format!("cannot load the placement: {e}")));
                        }
                    }
                }
            }
        };
        heartbeats.abort();
        set(Err("declared dead by the coordinators; registering again".into()));
        if let Silence::Failed = silence {
            tracing::error!(node = id, "the node failed; heartbeats stopped so the coordinators re-place its experts");
            return;
        }
        // What a dead node held is re-placed elsewhere; it starts over empty.
        if let Err(e) = compute.place(BTreeSet::new()).await {
            tracing::error!("cannot drop the experts: {e}");
        }
    }
}

/// What the node must hold: every expert any live epoch gives it. When that union does not fit
/// the memory budget (each epoch does, on its own), the retiring epoch's replicas go first, then
/// the active one's: the newest epoch is what the coordinators wait for.
fn target(placement: &Placement, id: u64, catalog: &Catalog) -> BTreeSet<(u32, u32)> {
    let all = held_by(placement, id, |_| true);
    if catalog.fits(all.len()) {
        return all;
    }
    tracing::warn!(node = id, "the live epochs' experts exceed the memory budget; freeing the retiring epoch's first");
    let current = held_by(placement, id, |e| e.state() != EpochState::Retiring);
    if catalog.fits(current.len()) {
        return current;
    }
    let newest = newest_epoch(placement);
    held_by(placement, id, |e| e.number == newest)
}

/// Sends heartbeats until the coordinator no longer knows node `id`, or the node fails.
async fn heartbeat(client: Client, id: u64, loaded: Arc<AtomicU64>, compute: Compute) -> Silence {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if compute.health.is_failed() {
            return Silence::Failed;
        }
        let beat = NodeHeartbeat {
            node_id: id,
            loaded_epoch: loaded.load(Ordering::Relaxed),
            held_bytes: compute.held.borrow().bytes as u64,
        };
        match client.heartbeat(beat).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(node = id, "the coordinators declared this node dead; registering again");
                return Silence::DeclaredDead;
            }
            Err(status) => tracing::debug!(node = id, "heartbeat not delivered: {}", status.message()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::v1::{Epoch, ExpertReplicas};

    fn epoch(number: u64, state: EpochState, experts: &[(u32, u32)]) -> Epoch {
        Epoch {
            number,
            state: state as i32,
            experts: experts.iter().map(|&(layer, expert)| ExpertReplicas { layer, expert, nodes: vec![7] }).collect(),
            reason: String::new(),
        }
    }

    #[test]
    fn live_epochs_over_the_budget_free_the_retiring_replicas_first_then_the_active_ones() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral");
        let one = Catalog::open(&dir, None).unwrap().expert_bytes();
        let store = Catalog::open(&dir, Some(2 * one)).unwrap();
        let set = |xs: &[(u32, u32)]| xs.iter().copied().collect::<BTreeSet<_>>();

        // Retiring {0,1} and active {2,3}: four experts for a budget of two.
        let mut p = Placement {
            epochs: vec![
                epoch(1, EpochState::Retiring, &[(0, 0), (0, 1)]),
                epoch(2, EpochState::Active, &[(0, 2), (0, 3)]),
            ],
            ..Default::default()
        };
        assert_eq!(target(&p, 7, &store), set(&[(0, 2), (0, 3)]));
        // Active {2,3} and pending {4,5}: the pending epoch is what the coordinators wait for.
        p.epochs =
            vec![epoch(2, EpochState::Active, &[(0, 2), (0, 3)]), epoch(3, EpochState::Pending, &[(0, 4), (0, 5)])];
        assert_eq!(target(&p, 7, &store), set(&[(0, 4), (0, 5)]));
        // Within the budget, the union of every live epoch.
        p.epochs = vec![epoch(2, EpochState::Active, &[(0, 2)]), epoch(3, EpochState::Pending, &[(0, 3)])];
        assert_eq!(target(&p, 7, &store), set(&[(0, 2), (0, 3)]));
        // Another node's experts are not ours.
        assert!(target(&p, 8, &store).is_empty());
    }
}
