//! The configured connections the scheduler probes, swapped whole on reload.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::ConnectionConfig;
use crate::domain::ConnectionId;

/// The configured connections, swapped whole on reload.
#[derive(Debug, Default)]
pub struct Roster {
    pub connections: HashMap<ConnectionId, Arc<ConnectionConfig>>,
}

impl Roster {
    pub fn new(connections: &[Arc<ConnectionConfig>]) -> Roster {
        Roster {
            connections: connections
                .iter()
                .map(|connection| (connection.id.clone(), connection.clone()))
                .collect(),
        }
    }
}
