"""Probe for docs/results/images_dmd2_gan.md: can the GAN head tell real digits from flipped real digits, and from
the trained DMD2 student's 1-step samples? Run from the repository root after training runs/images/dmd2-gansp-d1."""

import torch

from fewstep.config.build import load_run
from fewstep.data.images import real_images
from fewstep.methods._shared.dm import make_fake_score
from fewstep.methods._shared.gan import GANHead, discriminator_loss

torch.set_num_threads(1)
student = load_run("runs/images/dmd2-gansp-d1").student(ema=True)
x, y = real_images("digits8", "train")
for case in ("flipped", "student"):
    torch.manual_seed(0)
    fake = make_fake_score(student)
    head = GANHead(fake)
    opt = torch.optim.Adam([*fake.parameters(), *head.parameters()], lr=4e-4)
    for step in range(120):
        i, j = torch.randint(0, x.shape[0], (64,)), torch.randint(0, x.shape[0], (64,))
        c = y[i]
        if case == "flipped":
            xs = x[j].flip(-2)
        else:
            with torch.no_grad():
                xs = student(torch.randn(64, 1, 8, 8), torch.ones(64), torch.zeros(64), c)
        tau = torch.full((64,), 0.1)
        loss, logs = discriminator_loss(fake, head, x[i], xs, tau, tau, c)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 30 == 29:
            print(case, step, round(float(loss.detach()), 3), round(logs["gan_d_acc"], 3), flush=True)
