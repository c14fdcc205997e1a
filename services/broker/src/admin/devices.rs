//! Devices on the wire: the Admin API's device calls convert the `Device` message to the core's
//! [`DeviceInput`] and the stored record back (the ingress password only as `password_set`), and
//! call the core's domain-typed device resource ([`tokenfleet_core::resources::Devices`]:
//! authorization, validation, reference and login checks, the Argon2id password hash, versions,
//! audit). The web console calls the same operations without converting.

use tokenfleet_core::records::Versioned;
use tokenfleet_core::resources::devices::DeviceInput;
use tokenfleet_domain::Device;
use tokenfleet_proto::v1 as pb;

pub(crate) use tokenfleet_core::resources::Devices;

use crate::convert;

/// The core's form of a device a caller sent (validated by the core, after authorization).
pub(crate) fn device_in(wire: Option<pb::Device>) -> DeviceInput {
    convert::device_in(&wire.unwrap_or_default())
}

/// The wire form of a device and its version.
pub(crate) fn device_out(device: Versioned<Device>) -> pb::Device {
    convert::device_to_proto(&device.value, device.version)
}
