"""Made with the registry code of commit 4154ec2 (before migrations): a registry as today's servers write it."""
import importlib.util, sys, json
spec = importlib.util.spec_from_file_location("registry_v1", "/tmp/registry_v1.py")
mod = importlib.util.module_from_spec(spec); sys.modules["registry_v1"] = mod; spec.loader.exec_module(mod)
url = sys.argv[1]
reg = mod.Registry(url)
acme, key = reg.create_tenant("acme", True, {"requests_per_minute": 60}, "ci")
globex, key2 = reg.create_tenant("globex", False, {"max_adapters": 3})
v1 = mod.AdapterVersion("models:/acme~intent/1", "/srv/cache/aaa", "a" * 64, 16, 12345)
v2 = mod.AdapterVersion("models:/acme~intent/2", "/srv/cache/bbb", "b" * 64, 16, 23456)
reg.add_adapter(acme.id, "intent", v1, pinned=True, max_pinned=2)
reg.replace_adapter(acme.id, "intent", v2, expected_version=1)
reg.add_adapter(globex.id, "summary", mod.AdapterVersion("/srv/adapters/globex/s", "/srv/cache/ccc", "c" * 64, 8, 999))
revoked = reg.create_key("globex", "old")
reg.revoke_key(revoked.id, "globex")
reg.publish_replica_state("r1", {"cpu": [3]})
print(json.dumps({"acme_key": key.secret, "globex_key": key2.secret, "revoked_key": revoked.secret}))
