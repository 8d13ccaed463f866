"""`hmi bench`: naive per-tenant models, PEFT multi-adapter and HMI, same tenants and inputs, one run."""
