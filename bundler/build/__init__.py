"""The connected side: profile, lock, resolve, cache, build, kit, export."""
