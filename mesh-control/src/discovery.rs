//! Where the mesh's objects come from. Both sources produce the same [`ClusterObjects`] (the
//! Kubernetes types), which the control plane translates and distributes:
//!
//! - local mode (the embedded default): a directory of YAML, re-read on an interval; a bad file
//!   keeps the last good state (see `ControlPlane::reload`);
//! - Kubernetes: reflectors (watch + store, with backoff) on Namespaces, Pods, Services and the
//!   two CRDs; every change, debounced, yields a complete set.

use std::{fmt::Debug, hash::Hash, time::Duration};

use futures_util::{FutureExt as _, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use mesh_manifests::{
    ClusterObjects,
    crd::{AuthorizationPolicy, HttpRoute},
};
use serde::de::DeserializeOwned;

/// Changes arriving within this window are published together.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// A watched kind: its store, and its event stream (which keeps the store current).
struct Watched<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store: Store<K>,
    name: &'static str,
}

fn watch<K>(api: Api<K>, name: &'static str) -> (Watched<K>, BoxStream<'static, &'static str>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    // A failing watch retries with backoff; its error is logged when it changes, not each time.
    let mut last_error: Option<String> = None;
    let events = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .map(move |event| {
            match event {
                Err(err) => {
                    let message = err.to_string();
                    if last_error.as_ref() != Some(&message) {
                        tracing::warn!(kind = name, error = %message, "watch failed; retrying with backoff");
                        last_error = Some(message);
                    }
                }
                Ok(_) if last_error.take().is_some() => tracing::info!(kind = name, "watch recovered"),
                Ok(_) => {}
            }
            name
        })
        .boxed();
    (Watched { store, name }, events)
}

impl<K> Watched<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    /// Whether the initial list has completed.
    fn is_ready(&self) -> bool {
        self.store.wait_until_ready().now_or_never().is_some_and(|r| r.is_ok())
    }

    fn objects(&self) -> Vec<K> {
        self.store.state().iter().map(|o| (**o).clone()).collect()
    }
}

/// Watches the cluster and calls `publish` with every object the mesh reads, once the core
/// kinds are listed and then after each burst of changes. Runs until dropped.
pub async fn kubernetes(client: Client, publish: impl Fn(ClusterObjects) + Send + 'static) {
    let (namespaces, namespace_events) = watch(Api::<Namespace>::all(client.clone()), "Namespace");
    let (pods, pod_events) = watch(Api::<Pod>::all(client.clone()), "Pod");
    let (services, service_events) = watch(Api::<Service>::all(client.clone()), "Service");
    let (policies, policy_events) =
        watch(Api::<AuthorizationPolicy>::all(client.clone()), "AuthorizationPolicy");
    let (routes, route_events) = watch(Api::<HttpRoute>::all(client), "HTTPRoute");
    let mut events = futures_util::stream::select_all([
        namespace_events,
        pod_events,
        service_events,
        policy_events,
        route_events,
    ]);
    let mut published_once = false;
    while events.next().await.is_some() {
        // Let the burst settle: everything arriving within the window is one publication.
        let settle = tokio::time::sleep(DEBOUNCE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                () = &mut settle => break,
                more = events.next() => if more.is_none() { return },
            }
        }
        // The mesh cannot be judged from half a list: wait for the core kinds. The CRDs may
        // not be installed; their (empty) stores do not hold the mesh back.
        let core_ready = [namespaces.is_ready(), pods.is_ready(), services.is_ready()];
        if core_ready.contains(&false) {
            continue;
        }
        if !published_once {
            for (name, ready) in [(policies.name, policies.is_ready()), (routes.name, routes.is_ready())] {
                if !ready {
                    tracing::warn!(
                        kind = name,
                        "not listed yet (is its CRD installed?); proceeding without it"
                    );
                }
            }
            published_once = true;
        }
        publish(ClusterObjects {
            namespaces: namespaces.objects(),
            pods: pods.objects(),
            services: services.objects(),
            authorization_policies: policies.objects(),
            http_routes: routes.objects(),
        });
    }
}
