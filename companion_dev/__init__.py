"""Development tools that are not part of the device: the dev control plane
(``companion-controlplane``). The daemon never imports this package; a device install can
leave it out."""
