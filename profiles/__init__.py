"""Device profiles (``*.yaml``) and fleets (``fleets/*.yaml``), installed as the package
``fedlora_profiles`` so that a non-editable install finds them too."""
