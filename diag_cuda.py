import faulthandler, sys, torch
faulthandler.enable()
import ncfast
print("torch", torch.__version__, flush=True)
x = torch.randn(12, 5, device="cuda", dtype=torch.float64)
y = torch.randint(0, 3, (12,), device="cuda")
s = torch.randn(3, 5, device="cuda", dtype=torch.float64)
for dt in (torch.float64, torch.float32):
    print("calling class_moments", dt, flush=True)
    out = torch.ops.ncfast.class_moments(x.to(dt), y, s.to(dt))
    torch.cuda.synchronize()
    print([o.shape for o in out], flush=True)
print("nc4", flush=True)
sc = torch.randn(12, 6, device="cuda")
print(torch.ops.ncfast.nc4_mismatches(sc, None, torch.randn(3, device="cuda")), flush=True)
if len(sys.argv) > 1:
    print("opcheck", flush=True)
    torch.library.opcheck(torch.ops.ncfast.class_moments.default, (x.float(), y, s.float()))
    print("opcheck ok", flush=True)
