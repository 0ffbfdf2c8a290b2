"""The bundle format both sides read: manifest, models, archive, signing, volumes, image
references, platforms, npm lock and tree, the kit's bootstrap, what a host needs."""
