"""Device profiles (``*.yaml``) and fleets (``fleets/*.yaml``), installed as the package
``fedlora_edge.profiles`` so that a non-editable install finds them too."""
