import torch, warnings
from torch import nn
from lightning_ntk import NTKTracker
warnings.simplefilter("always")
torch.manual_seed(0)
x = torch.randn(64, 6); t = (x[:,0] > 0).float()
m = nn.Sequential(nn.Linear(6,16), nn.Tanh(), nn.Linear(16,1))
for y in [t[:8], t[:8].long(), t[:8, None]]:
    tr = NTKTracker(x[:8], y)
    tr.start(m); r = tr.update(m, 1)
    print(y.dtype, tuple(y.shape), "ta", r.target_alignment, "|", [s for s in str(r.setup).split(';') if 'targets' in s])
