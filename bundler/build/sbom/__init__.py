"""The bundle's CycloneDX SBOM (docs/sbom.md): what `bundle build` carries and what its images
hold, made with the maintained CycloneDX library, checked against its schema, emitted with
fixed serial number and time so the same inputs give the same bytes."""
