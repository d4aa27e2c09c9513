"""The device registry service: devices join a fleet, declare resources, and stay known while they heartbeat."""
