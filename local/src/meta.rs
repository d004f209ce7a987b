//! Clients of a cluster with a metadata service: the live cluster map instead of the
//! cluster file's copy.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use drs_client::{Client, ClientConfig, ClientError, MapSource};
use drs_meta::MetaClient;
use drs_proto::{ClusterKey, ClusterMap, VolumeId};

/// The metadata service as a [`MapSource`].
pub struct MetaMaps(pub MetaClient);

impl MapSource for MetaMaps {
    fn watch(
        &self,
        after: u64,
    ) -> Pin<Box<dyn Future<Output = Result<ClusterMap, String>> + Send + '_>> {
        Box::pin(async move {
            self.0
                .watch(after)
                .await
                .map(|s| s.cluster_map())
                .map_err(|e| e.to_string())
        })
    }
}

/// A client of volume `vid`: with a metadata service, it follows the live map (its
/// first answer comes at once, as the service's epoch is past the file's); otherwise
/// `map` is the whole truth. Call inside a tokio runtime.
pub fn client(map: ClusterMap, vid: VolumeId, cfg: ClientConfig) -> Result<Client, ClientError> {
    let meta = MetaClient::for_map(&map, &cfg.key);
    let client = Client::new(map, vid, cfg)?;
    if let Some(meta) = meta {
        client.follow(Arc::new(MetaMaps(meta)));
    }
    Ok(client)
}

/// The whole map for a map that may be only a locator (see
/// [`ClusterMap::is_locator`]): read from the metadata service.
pub async fn resolve(map: ClusterMap, key: &ClusterKey) -> Result<ClusterMap, String> {
    if !map.is_locator() {
        return Ok(map);
    }
    let meta = MetaClient::for_map(&map, key).ok_or("no metadata service in the locator")?;
    let state = meta
        .read()
        .await
        .map_err(|e| format!("cannot read the cluster map from the metadata service: {e}"))?;
    Ok(state.cluster_map())
}
