"""The demo directory `serve` creates on first run without a directory file: two central
hospitals, three district hospitals, one commune clinic, their provinces' names and a clinician
of each role but site admin (an admin adds one through ``/api/directory/clinicians``). It only
seeds an empty store (``signaling.store``)."""

from __future__ import annotations

from pathlib import Path

DEMO_DIRECTORY = """\
# Demo directory created by `telehealth serve` because no [directory] file was configured.
# It seeds the (empty) store on the first start only; change the directory afterwards with
# `telehealth directory import` or the admin API (/api/directory/...).

# Province codes (General Statistics Office of Vietnam) and their names: the UI shows names.
[[regions]]
id = "01"
name = "Hà Nội"

[[regions]]
id = "11"
name = "Điện Biên"

[[regions]]
id = "22"
name = "Quảng Ninh"

[[regions]]
id = "56"
name = "Khánh Hòa"

[[regions]]
id = "79"
name = "Thành phố Hồ Chí Minh"

[[sites]]
id = "bv-bachmai"
name = "Bệnh viện Bạch Mai"
tier = "central"
region = "01"

[[sites]]
id = "bv-choray"
name = "Bệnh viện Chợ Rẫy"
tier = "central"
region = "79"

[[sites]]
id = "ttyt-muongnhe"
name = "Trung tâm Y tế huyện Mường Nhé"
tier = "district"
region = "11"

[[sites]]
id = "bv-cangio"
name = "Bệnh viện huyện Cần Giờ"
tier = "district"
region = "79"

[[sites]]
id = "ttyt-coto"
name = "Trung tâm Y tế huyện Cô Tô"
tier = "district"
region = "22"

[[sites]]
id = "tyt-truongsa"
name = "Trạm Y tế xã đảo Trường Sa"
tier = "commune"
region = "56"

[[clinicians]]
id = "bs-lan"
name = "BS. Nguyễn Thị Lan"
site = "ttyt-muongnhe"
roles = ["referring"]

[[clinicians]]
id = "bs-hai"
name = "BS. Trần Văn Hải"
site = "bv-cangio"
roles = ["referring"]

[[clinicians]]
id = "bs-minh"
name = "BS. Phạm Đức Minh"
site = "tyt-truongsa"
roles = ["referring"]

[[clinicians]]
id = "bs-hung"
name = "PGS.TS. Lê Quang Hùng"
site = "bv-bachmai"
roles = ["specialist"]
specialties = ["cardiology", "internal-medicine"]

[[clinicians]]
id = "bs-thu"
name = "TS.BS. Võ Minh Thư"
site = "bv-choray"
roles = ["specialist"]
specialties = ["infectious-disease", "intensive-care"]

[[clinicians]]
id = "dp-mai"
name = "Điều phối viên Đỗ Thanh Mai"
site = "bv-bachmai"
roles = ["coordinator"]

[[clinicians]]
id = "it-khoa"
name = "Kỹ sư CNTT Hoàng Anh Khoa"
site = "bv-bachmai"
roles = ["admin"]
"""


def ensure_demo_directory(data_dir: Path) -> Path:
    """Write the demo directory into ``data_dir`` unless it is there already; return its path."""
    path = data_dir / "demo-directory.toml"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(DEMO_DIRECTORY, encoding="utf-8")
    return path
